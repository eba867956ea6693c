/* Masked linear layers of a MADE (normflux, nets/native_made.py) for float32 CPU tensors:
 * the forward y = x (W * M)^T + b (+ a context term, then a ReLU), and the backward's two
 * products, in registers, skipping the blocks where the mask M is zero.
 *
 * Why: a MADE's masks are made from degrees (Germain et al. 2015, eq. 13-14); with the
 * hidden units in order of degree (nets/made.py) each mask is a staircase, about half
 * zeros, and a dense GEMM multiplies them all. Here the output columns are taken in
 * panels of NR = 32 and the batch rows in tiles of MR = 12; each 16-column half of a
 * panel multiplies only the range of inputs where its rows of M are not zero (and the
 * weight gradient's tiles that M zeroes are not computed). For B2 of the speed suite
 * (MADE 16-128-128-32, batch 1024) that is 58 % of the hidden layer's multiply-adds. Any mask is exact: the skipped
 * products are those with a zero factor of M (rows of M that are not a staircase only
 * save less).
 *
 * The micro-kernel (tile) keeps a 12 x 32 block of the result in 24 AVX-512 registers and
 * adds one rank-one product per step: two vectors of the packed right factor, one
 * broadcast per row of the left one, fused multiply-adds (rounded once each, as the BLAS
 * of PyTorch's CPU builds does). Its epilogue applies the layer's bias and ReLU, the
 * ReLU's backward mask or the weight mask while the block is in registers, so that no
 * separate pass over the output is made.
 *
 * Built at first use with the other kernels (transforms/native.py). Without AVX-512
 * (the plainer fallback builds, other CPUs) nfx_masked_available() is 0 and the MADE
 * runs on torch's GEMMs.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>

#define MR 12 /* rows of a tile */
#define NR 32 /* columns of a panel: two vectors of 16 floats */

enum { EPI_STORE, EPI_BIAS, EPI_BIAS_RELU, EPI_RELU_GRAD, EPI_MASK };

#define REPEAT12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

/* C[i, 0:width] = epilogue(sum_k A[i * ars + k * aks] B[k * bks + 0:width]) for i < mr,
 * the columns beyond width masked out (m0, m1), the sum over k in r[0] <= k < r[1] for
 * the first vector of 16 columns and r[2] <= k < r[3] for the second (each vector's
 * range where its part of the mask is not zero: outside it the products are zero). E is
 * the epilogue's operand: the bias (a row, and the extra term X with row stride ldx when
 * X is not null), the ReLU's input h (row stride lde: the gradient passes where
 * !(h <= 0), as torch's threshold_backward) or the mask (row stride lde). mr, nv and epi
 * are constants after inlining: one specialised loop per case, the accumulators in
 * registers. */
static inline __attribute__((always_inline)) void
tile(const int mr, const int nv, const int epi, const int64_t *r, const float *A, int64_t ars,
     int64_t aks, const float *B, int64_t bks, float *C, int64_t ldc, __mmask16 m0,
     __mmask16 m1, const float *E, int64_t lde, const float *X, int64_t ldx) {
    const __m512 zero = _mm512_setzero_ps();
#define DECL(i) __m512 c0_##i = zero, c1_##i = zero;
    REPEAT12(DECL)
#undef DECL
#define STEP(i)                                                                            \
        if (i < mr) {                                                                      \
            const __m512 av = _mm512_set1_ps(a[i * ars]);                                  \
            if (u0) c0_##i = _mm512_fmadd_ps(av, b0, c0_##i);                              \
            if (u1) c1_##i = _mm512_fmadd_ps(av, b1, c1_##i);                              \
        }
#define KLOOP(FROM, TO, U0, U1)                                                            \
    {                                                                                      \
        const int u0 = (U0), u1 = (U1);                                                    \
        for (int64_t k = (FROM); k < (TO); k++) {                                          \
            const float *b = B + k * bks;                                                  \
            const __m512 b0 = u0 ? _mm512_maskz_loadu_ps(m0, b) : zero;                    \
            const __m512 b1 = u1 ? _mm512_maskz_loadu_ps(m1, b + 16) : zero;               \
            const float *a = A + k * aks;                                                  \
            REPEAT12(STEP)                                                                 \
        }                                                                                  \
    }
    if (nv == 1 || r[2] >= r[3]) {
        KLOOP(r[0], r[1], 1, 0)
    } else if (r[0] >= r[1]) {
        KLOOP(r[2], r[3], 0, 1)
    } else {
        const int64_t both_lo = r[0] > r[2] ? r[0] : r[2], both_hi = r[1] < r[3] ? r[1] : r[3];
        if (both_lo >= both_hi) { /* disjoint ranges */
            KLOOP(r[0], r[1], 1, 0)
            KLOOP(r[2], r[3], 0, 1)
        } else {
            if (r[0] < both_lo) KLOOP(r[0], both_lo, 1, 0)
            if (r[2] < both_lo) KLOOP(r[2], both_lo, 0, 1)
            KLOOP(both_lo, both_hi, 1, 1)
            if (r[1] > both_hi) KLOOP(both_hi, r[1], 1, 0)
            if (r[3] > both_hi) KLOOP(both_hi, r[3], 0, 1)
        }
    }
#undef KLOOP
#undef STEP
    __m512 e0 = zero, e1 = zero;
    if (epi == EPI_BIAS || epi == EPI_BIAS_RELU) {
        e0 = _mm512_maskz_loadu_ps(m0, E);
        if (nv == 2) e1 = _mm512_maskz_loadu_ps(m1, E + 16);
    }
#define EPILOGUE(i)                                                                        \
    if (i < mr) {                                                                          \
        __m512 v0 = c0_##i, v1 = c1_##i;                                                   \
        if (epi == EPI_BIAS || epi == EPI_BIAS_RELU) {                                     \
            v0 = _mm512_add_ps(v0, e0);                                                    \
            if (nv == 2) v1 = _mm512_add_ps(v1, e1);                                       \
            if (X) {                                                                       \
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, X + i * ldx));            \
                if (nv == 2) v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, X + i * ldx + 16)); \
            }                                                                              \
            if (epi == EPI_BIAS_RELU) {                                                    \
                /* max(0, v): x86's max returns its second operand when one is NaN,  \
                 * so a NaN passes, as torch.relu's */                                    \
                v0 = _mm512_max_ps(zero, v0);                                              \
                if (nv == 2) v1 = _mm512_max_ps(zero, v1);                                 \
            }                                                                              \
        } else if (epi == EPI_RELU_GRAD) {                                                 \
            const float *e = E + i * lde;                                                  \
            v0 = _mm512_maskz_mov_ps(                                                      \
                _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(m0, e), zero, _CMP_NLE_UQ), v0);  \
            if (nv == 2)                                                                   \
                v1 = _mm512_maskz_mov_ps(                                                  \
                    _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(m1, e + 16), zero, _CMP_NLE_UQ), \
                    v1);                                                                   \
        } else if (epi == EPI_MASK) {                                                      \
            const float *e = E + i * lde;                                                  \
            v0 = _mm512_mul_ps(v0, _mm512_maskz_loadu_ps(m0, e));                          \
            if (nv == 2) v1 = _mm512_mul_ps(v1, _mm512_maskz_loadu_ps(m1, e + 16));        \
        }                                                                                  \
        _mm512_mask_storeu_ps(C + i * ldc, m0, v0);                                        \
        if (nv == 2) _mm512_mask_storeu_ps(C + i * ldc + 16, m1, v1);                      \
    }
    REPEAT12(EPILOGUE)
#undef EPILOGUE
}

#define TILE_CASE(R, NV, EPI)                                                              \
    case R:                                                                                \
        tile(R, NV, EPI, r, A, ars, aks, B, bks, C, ldc, m0, m1, E, lde, X, ldx);          \
        break;
#define TILE_SWITCH(NV, EPI)                                                               \
    switch (mr) {                                                                          \
        TILE_CASE(1, NV, EPI) TILE_CASE(2, NV, EPI) TILE_CASE(3, NV, EPI)                  \
        TILE_CASE(4, NV, EPI) TILE_CASE(5, NV, EPI) TILE_CASE(6, NV, EPI)                  \
        TILE_CASE(7, NV, EPI) TILE_CASE(8, NV, EPI) TILE_CASE(9, NV, EPI)                  \
        TILE_CASE(10, NV, EPI) TILE_CASE(11, NV, EPI) TILE_CASE(12, NV, EPI)               \
    }                                                                                      \
    break;
#define EPI_SWITCH(NV)                                                                     \
    switch (epi) {                                                                         \
    case EPI_STORE: TILE_SWITCH(NV, EPI_STORE)                                             \
    case EPI_BIAS: TILE_SWITCH(NV, EPI_BIAS)                                               \
    case EPI_BIAS_RELU: TILE_SWITCH(NV, EPI_BIAS_RELU)                                     \
    case EPI_RELU_GRAD: TILE_SWITCH(NV, EPI_RELU_GRAD)                                     \
    case EPI_MASK: TILE_SWITCH(NV, EPI_MASK)                                               \
    }

/* the lanes of vector v (0 or 1) of a panel that the first width <= NR columns cover */
static inline __mmask16 lanes(int64_t width, int v) {
    const int64_t n = width - 16 * v;
    return n >= 16 ? (__mmask16)0xFFFF : n > 0 ? (__mmask16)((1u << n) - 1) : (__mmask16)0;
}

/* a tile of mr <= MR rows and width <= NR columns, r[0..3] the vectors' ranges of k */
static void run_tile(int mr, int width, int epi, const int64_t *r, const float *A, int64_t ars,
                     int64_t aks, const float *B, int64_t bks, float *C, int64_t ldc,
                     const float *E, int64_t lde, const float *X, int64_t ldx) {
    const __mmask16 m0 = lanes(width, 0), m1 = lanes(width, 1);
    if (width > 16) {
        EPI_SWITCH(2)
    } else {
        EPI_SWITCH(1)
    }
}

/* w * m where m is not zero, and 0 where it is: a weight the mask excludes never reaches
 * the products, even an inf or NaN one (whose product with 0 would be NaN) */
static inline __m512 masked_weights(__m512 w, __m512 m) {
    return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_NEQ_UQ), w, m);
}

/* r[j][i] <- r[i][j] for the 16 x 16 floats of r (unpacks within 128-bit lanes, then a
 * 4 x 4 transpose of the lanes) */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* r[4 q + c], lane L: column 4 L + c of rows 4 q .. 4 q + 3 */
    for (int q = 0; q < 4; q++) {
        r[4 * q] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
        r[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
        r[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
        r[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
        const __m512 v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
        const __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
        const __m512 v3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
        t[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        t[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        t[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        t[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Packs W * M (W, M: (rows, cols) row-major) into panels of NR consecutive "outer"
 * indices by "inner" index, zero-padded: P[p][inner][j] for outer = p * NR + j. With
 * by_row, outer is the row (the forward's W^T), else the column (the input gradient's W).
 * r[4 p + 2 v], r[4 p + 2 v + 1]: the range of inner indices where the part of M under
 * the panel's vector v (16 outer indices) is not all zero (0, 0 where it is all zero),
 * as tile() reads them. Returns the buffer (free it) or null. */
static float *pack(int64_t rows, int64_t cols, const float *w, const float *mask, int by_row,
                   int64_t *r) {
    const int64_t outer = by_row ? rows : cols, inner = by_row ? cols : rows;
    const int64_t np = (outer + NR - 1) / NR;
    float *P = aligned_alloc(64, (size_t)(np * inner * NR) * sizeof(float));
    if (!P) return NULL;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
        const int64_t o0 = p * NR, width = outer - o0 < NR ? outer - o0 : NR;
        float *Pp = P + p * inner * NR;
        int64_t l[2] = {inner, inner}, h[2] = {0, 0};
        if (by_row) { /* W^T: row o0 + j of W is column j of the panel, 16 x 16 blocks */
            for (int v = 0; v < 2; v++) {
                const int64_t j0 = 16 * v, wv = width - j0;
                for (int64_t t0 = 0; t0 < inner; t0 += 16) {
                    const int64_t n = inner - t0 < 16 ? inner - t0 : 16;
                    const __mmask16 cm = (__mmask16)((1u << n) - 1);
                    __m512 blk[16];
                    for (int i = 0; i < 16; i++) {
                        blk[i] = zero;
                        if (i < wv) {
                            const int64_t q = (o0 + j0 + i) * cols + t0;
                            blk[i] = masked_weights(_mm512_maskz_loadu_ps(cm, w + q),
                                                    _mm512_maskz_loadu_ps(cm, mask + q));
                        }
                    }
                    transpose16(blk);
                    for (int64_t j = 0; j < n; j++) _mm512_store_ps(Pp + (t0 + j) * NR + j0, blk[j]);
                }
            }
            for (int64_t j = 0; j < width; j++) {
                const float *mr = mask + (o0 + j) * cols;
                int64_t a = 0, b = inner;
                while (a < b && mr[a] == 0.0f) a++;
                while (b > a && mr[b - 1] == 0.0f) b--;
                if (a < b) {
                    const int v = j >= 16;
                    if (a < l[v]) l[v] = a;
                    if (b > h[v]) h[v] = b;
                }
            }
        } else { /* W: columns o0 .. o0 + width of each row */
            const __mmask16 m0 = lanes(width, 0), m1 = lanes(width, 1);
            for (int64_t t = 0; t < inner; t++) {
                const float *wr = w + t * cols + o0, *mr = mask + t * cols + o0;
                const __m512 k0 = _mm512_maskz_loadu_ps(m0, mr);
                const __m512 k1 = _mm512_maskz_loadu_ps(m1, mr + 16);
                _mm512_store_ps(Pp + t * NR, masked_weights(_mm512_maskz_loadu_ps(m0, wr), k0));
                _mm512_store_ps(Pp + t * NR + 16,
                                masked_weights(_mm512_maskz_loadu_ps(m1, wr + 16), k1));
                /* not equal to zero: NaN counts as not zero */
                if (_mm512_cmp_ps_mask(k0, zero, _CMP_NEQ_UQ)) {
                    if (t < l[0]) l[0] = t;
                    h[0] = t + 1;
                }
                if (_mm512_cmp_ps_mask(k1, zero, _CMP_NEQ_UQ)) {
                    if (t < l[1]) l[1] = t;
                    h[1] = t + 1;
                }
            }
        }
        for (int v = 0; v < 2; v++) {
            r[4 * p + 2 * v] = h[v] ? l[v] : 0;
            r[4 * p + 2 * v + 1] = h[v];
        }
    }
    return P;
}

int nfx_masked_available(void) { return 1; }

/* C (M, outer) = epilogue(A (M, inner) (W * M) or A (W * M)^T): the product of A with the
 * panels that pack() makes of W * M (W, M: (rows, cols); by_row: W^T, outer = rows), tile
 * by tile. The epilogue's operand E is a row (bias: e_rows 0) or has a row per row of C
 * (the ReLU's input: e_rows 1); X, when not null, is added (rows of stride ldx). Returns
 * 0, or -1 when out of memory (C untouched). */
static int packed_product(int64_t M, int64_t rows, int64_t cols, const float *w,
                          const float *mask, int by_row, const float *A, float *C, int epi,
                          const float *E, int e_rows, const float *X, int64_t ldx) {
    const int64_t outer = by_row ? rows : cols, inner = by_row ? cols : rows;
    const int64_t np = (outer + NR - 1) / NR;
    int64_t *r = malloc((size_t)(4 * np) * sizeof(int64_t));
    float *P = r ? pack(rows, cols, w, mask, by_row, r) : NULL;
    if (!P) {
        free(r);
        return -1;
    }
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int mr = M - m0 < MR ? (int)(M - m0) : MR;
        for (int64_t p = 0; p < np; p++) {
            const int64_t o0 = p * NR;
            const int width = outer - o0 < NR ? (int)(outer - o0) : NR;
            run_tile(mr, width, epi, r + 4 * p, A + m0 * inner, inner, 1, P + p * inner * NR,
                     NR, C + m0 * outer + o0, outer,
                     E ? E + (e_rows ? m0 * outer : 0) + o0 : NULL, e_rows ? outer : 0,
                     X ? X + m0 * ldx + o0 : NULL, ldx);
        }
    }
    free(P);
    free(r);
    return 0;
}

/* out (M, N) = x (M, K) (w * mask)^T + b [+ extra (rows of stride ld_extra)], then a
 * ReLU when relu; w, mask (N, K), b (N,). Every tensor contiguous (extra: unit column
 * stride). Returns 0, or -1 when out of memory (out untouched). */
int nfx_masked_forward(int64_t M, int64_t K, int64_t N, const float *x, const float *w,
                       const float *mask, const float *b, const float *extra,
                       int64_t ld_extra, int relu, float *out) {
    return packed_product(M, N, K, w, mask, 1, x, out, relu ? EPI_BIAS_RELU : EPI_BIAS, b, 0,
                          extra, ld_extra);
}

/* gx (M, K) = g (M, N) (w * mask), times [!(h <= 0)] elementwise when h (M, K) is not
 * null (the backward of the ReLU that made the layer's input h). Returns 0, or -1 when
 * out of memory. */
int nfx_masked_grad_input(int64_t M, int64_t K, int64_t N, const float *g, const float *w,
                          const float *mask, const float *h, float *gx) {
    return packed_product(M, N, K, w, mask, 0, g, gx, h ? EPI_RELU_GRAD : EPI_STORE, h, 1,
                          NULL, 0);
}

/* gw (N, K) = (g^T h) * mask for g (M, N), h (M, K), mask (N, K); gb (N,) = the column
 * sums of g, accumulated in double. Tiles of gw that the mask zeroes are set to zero
 * without their products. Returns 0 (the int of its siblings). */
int nfx_masked_grad_weight(int64_t M, int64_t K, int64_t N, const float *g, const float *h,
                           const float *mask, float *gw, float *gb) {
    for (int64_t n0 = 0; n0 < N; n0 += MR) {
        const int mr = N - n0 < MR ? (int)(N - n0) : MR;
        for (int64_t k0 = 0; k0 < K; k0 += NR) {
            const int width = K - k0 < NR ? (int)(K - k0) : NR;
            /* whether each vector's part of the mask is not zero (NaN counts as not zero) */
            const __mmask16 m0 = lanes(width, 0), m1 = lanes(width, 1);
            const __m512 zero = _mm512_setzero_ps();
            int any[2] = {0, 0};
            for (int i = 0; i < mr; i++) {
                const float *mk = mask + (n0 + i) * K + k0;
                any[0] |= _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(m0, mk), zero, _CMP_NEQ_UQ) != 0;
                any[1] |= _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(m1, mk + 16), zero, _CMP_NEQ_UQ) != 0;
            }
            if (any[0] || any[1]) {
                const int64_t r[4] = {0, any[0] ? M : 0, 0, any[1] ? M : 0};
                run_tile(mr, width, EPI_MASK, r, g + n0, 1, N, h + k0, K, gw + n0 * K + k0, K,
                         mask + n0 * K + k0, K, NULL, 0);
            } else {
                for (int i = 0; i < mr; i++)
                    memset(gw + (n0 + i) * K + k0, 0, (size_t)width * sizeof(float));
            }
        }
    }
    enum { CHUNK = 256 };
    double acc[CHUNK];
    for (int64_t n0 = 0; n0 < N; n0 += CHUNK) {
        const int64_t n = N - n0 < CHUNK ? N - n0 : CHUNK;
        for (int64_t j = 0; j < n; j++) acc[j] = 0.0;
        for (int64_t m = 0; m < M; m++) {
            const float *gm = g + m * N + n0;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) acc[j] += (double)gm[j];
        }
        for (int64_t j = 0; j < n; j++) gb[n0 + j] = (float)acc[j];
    }
    return 0;
}
#else
int nfx_masked_available(void) { return 0; }
int nfx_masked_forward(int64_t M, int64_t K, int64_t N, const float *x, const float *w,
                       const float *mask, const float *b, const float *extra,
                       int64_t ld_extra, int relu, float *out) {
    return -2;
}
int nfx_masked_grad_input(int64_t M, int64_t K, int64_t N, const float *g, const float *w,
                          const float *mask, const float *h, float *gx) {
    return -2;
}
int nfx_masked_grad_weight(int64_t M, int64_t K, int64_t N, const float *g, const float *h,
                           const float *mask, float *gw, float *gb) {
    return -2;
}
#endif
