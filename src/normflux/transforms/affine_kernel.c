/* The affine coupling step of normflux (transforms/bijections.py, _AffineCoupling) for
 * CPU tensors: one call for the forward, one for the backward, in place of some twenty
 * tensor ops whose fixed cost dominates a small coupling layer.
 *
 * For rows i < B of x (B, D) and the transformed columns c_k = cols[k], k < n, with the
 * parameters p[i, k] = (t, r) of a (B, n, 2) tensor and the log-scale bound b:
 *
 *   s = b tanh(r / b),  e = exp(s)
 *   y[i, c_k] = x[i, c_k] e + t,   y[i, c] = x[i, c] for the other columns,
 *   ladj[i] = sum_k s
 *
 * and the VJP with the gradients gy (B, D) of y, gl (B,) of ladj and gs (B, n) of s (an
 * output too; none when unused):
 *
 *   gx[i, c_k] = gy[i, c_k] e,   gx[i, c] = gy[i, c] for the other columns,
 *   gp[i, k] = (gy[i, c_k],  (gl[i] + gs[i, k] + gy[i, c_k] e x[i, c_k]) (1 - (s / b)^2)).
 *
 * The forward returns s (B, n), the one value per element the backward reads. All
 * arithmetic in double whatever the storage type (one rounding on store); the same
 * formulas as the tensor ops of bijections.py. Every tensor is contiguous (the caller,
 * native_affine.py, makes it so). When every column is transformed, in order (an
 * autoregressive layer), the loops run over the elements themselves, contiguous;
 * otherwise over the rows, column by column. tanh(u) is computed as
 * sign(u) (-expm1(-2|u|)) / (2 + expm1(-2|u|)) (exact to a few ulp of double, no
 * cancellation near 0: about 15 % faster than glibc's vector tanh on B2 of the speed
 * suite's layers). expm1 and exp through glibc's vector math
 * library where the build declares them SIMD (NFX_SIMD_MATH, see native.py).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef NFX_SIMD_MATH
#pragma omp declare simd notinbranch
double exp(double);
#pragma omp declare simd notinbranch
double expm1(double);
#endif

/* bound tanh(r / bound), the bounded log-scale */
#define BOUNDED(r, bound)                                                                  \
    (copysign((bound) * (-expm1(-2.0 * fabs((r) / (bound))) /                              \
                         (2.0 + expm1(-2.0 * fabs((r) / (bound))))), (r)))

/* rows handled together by the loops over rows (few transformed columns) */
#define AFFINE_TILE 256
/* elements handled together when every column is transformed */
#define AFFINE_BLOCK 1024

/* whether the transformed columns are all the columns, in order (an autoregressive layer):
 * then element (i, k) of the parameters is element i * D + k of x and y */
static int all_columns(int64_t D, int64_t n, const int64_t *cols) {
    if (n != D) return 0;
    for (int64_t k = 0; k < n; k++)
        if (cols[k] != k) return 0;
    return 1;
}

#define AFFINE_KERNELS(T, SUFFIX)                                                          \
static void forward_##SUFFIX(int64_t B, int64_t D, int64_t n, const T *x, const T *p,      \
                             const int64_t *cols, double bound, T *y, T *ladj, T *s_out) {  \
    if (n <= AFFINE_BLOCK && all_columns(D, n, cols)) {                                    \
        const int64_t rows = AFFINE_BLOCK / n;                                             \
        double sb[AFFINE_BLOCK];                                                           \
        for (int64_t i0 = 0; i0 < B; i0 += rows) {                                         \
            const int64_t m = (B - i0 < rows ? B - i0 : rows) * n, q0 = i0 * n;            \
            const T *pq = p + 2 * q0, *xq = x + q0;                                        \
            _Pragma("omp simd")                                                            \
            for (int64_t j = 0; j < m; j++) {                                              \
                const double s = BOUNDED((double)pq[2 * j + 1], bound);                    \
                sb[j] = s;                                                                 \
                s_out[q0 + j] = (T)s;                                                      \
                y[q0 + j] = (T)((double)xq[j] * exp(s) + (double)pq[2 * j]);               \
            }                                                                              \
            for (int64_t j = 0; j < m; j += n) {                                           \
                double acc = 0.0;                                                          \
                for (int64_t k = 0; k < n; k++) acc += sb[j + k];                          \
                ladj[i0 + j / n] = (T)acc;                                                 \
            }                                                                              \
        }                                                                                  \
        return;                                                                            \
    }                                                                                      \
    memcpy(y, x, (size_t)(B * D) * sizeof(T));                                             \
    for (int64_t i0 = 0; i0 < B; i0 += AFFINE_TILE) {                                      \
        const int64_t m = B - i0 < AFFINE_TILE ? B - i0 : AFFINE_TILE;                     \
        double acc[AFFINE_TILE];                                                           \
        for (int64_t j = 0; j < m; j++) acc[j] = 0.0;                                      \
        for (int64_t k = 0; k < n; k++) {                                                  \
            const int64_t c = cols[k];                                                     \
            _Pragma("omp simd")                                                            \
            for (int64_t j = 0; j < m; j++) {                                              \
                const int64_t i = i0 + j;                                                  \
                const double t = p[(i * n + k) * 2], r = p[(i * n + k) * 2 + 1];           \
                const double s = BOUNDED(r, bound);                                        \
                y[i * D + c] = (T)(x[i * D + c] * exp(s) + t);                             \
                s_out[i * n + k] = (T)s;                                                   \
                acc[j] += s;                                                               \
            }                                                                              \
        }                                                                                  \
        for (int64_t j = 0; j < m; j++) ladj[i0 + j] = (T)acc[j];                          \
    }                                                                                      \
}                                                                                          \
                                                                                           \
static void backward_##SUFFIX(int64_t B, int64_t D, int64_t n, const T *gy, const T *gl,   \
                              const T *gs, const T *x, const int64_t *cols, const T *s_in, \
                              double bound, T *gx, T *gp) {                                \
    if (all_columns(D, n, cols)) {                                                         \
        for (int64_t i = 0; i < B; i++) {                                                  \
            const double g_l = gl[i];                                                      \
            const int64_t q0 = i * n;                                                      \
            _Pragma("omp simd")                                                            \
            for (int64_t k = 0; k < n; k++) {                                              \
                const int64_t q = q0 + k;                                                  \
                const double g = gy[q], s = s_in[q], th = s / bound;                       \
                const double g_x = g * exp(s);                                             \
                const double g_s = g_l + (gs ? (double)gs[q] : 0.0);                       \
                if (gx) gx[q] = (T)g_x;                                                    \
                gp[2 * q] = (T)g;                                                          \
                gp[2 * q + 1] = (T)((g_s + g_x * (double)x[q]) * (1.0 - th * th));         \
            }                                                                              \
        }                                                                                  \
        return;                                                                            \
    }                                                                                      \
    if (gx) memcpy(gx, gy, (size_t)(B * D) * sizeof(T));                                   \
    for (int64_t k = 0; k < n; k++) {                                                      \
        const int64_t c = cols[k];                                                         \
        _Pragma("omp simd")                                                                \
        for (int64_t i = 0; i < B; i++) {                                                  \
            const double g = gy[i * D + c], s = s_in[i * n + k], th = s / bound;           \
            const double g_x = g * exp(s);                                                 \
            const double g_s = (double)gl[i] + (gs ? (double)gs[i * n + k] : 0.0);         \
            if (gx) gx[i * D + c] = (T)g_x;                                                \
            gp[(i * n + k) * 2] = (T)g;                                                    \
            gp[(i * n + k) * 2 + 1] =                                                      \
                (T)((g_s + g_x * (double)x[i * D + c]) * (1.0 - th * th));                 \
        }                                                                                  \
    }                                                                                      \
}

AFFINE_KERNELS(float, f32)
AFFINE_KERNELS(double, f64)

/* x (B, D), p (B, n, 2), cols (n,) -> y (B, D), ladj (B,), s (B, n). */
void nfx_affine_coupling_forward(int is_double, int64_t B, int64_t D, int64_t n,
                                 const void *x, const void *p, const int64_t *cols,
                                 double bound, void *y, void *ladj, void *s) {
    if (is_double)
        forward_f64(B, D, n, x, p, cols, bound, y, ladj, s);
    else
        forward_f32(B, D, n, x, p, cols, bound, y, ladj, s);
}

/* gy (B, D), gl (B,), gs (B, n) or null, x (B, D), cols (n,), s (B, n) -> gx (B, D)
 * (skipped when null), gp (B, n, 2). */
void nfx_affine_coupling_backward(int is_double, int64_t B, int64_t D, int64_t n,
                                  const void *gy, const void *gl, const void *gs,
                                  const void *x, const int64_t *cols, const void *s,
                                  double bound, void *gx, void *gp) {
    if (is_double)
        backward_f64(B, D, n, gy, gl, gs, x, cols, s, bound, gx, gp);
    else
        backward_f32(B, D, n, gy, gl, gs, x, cols, s, bound, gx, gp);
}
