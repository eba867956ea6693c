/* Rational-quadratic spline with linear tails: forward and first-order backward for CPU
 * tensors (normflux, transforms/native_spline.py).
 *
 * The map is spline_knots() followed by rational_quadratic_spline() of splines.py
 * (Durkan et al. 2019, eq. 4 and appendix A; the inverse takes the stable root), and
 * the backward is the closed form of fused_spline.py's module docstring. Everything is
 * computed in double precision whatever the storage type, and rounded once on store.
 *
 * The forward can save what the backward needs of the located bin, per element and in
 * double precision: the bin coordinate xi, the bin's width w, height h and end slopes
 * d0, d1, the bin index (-1 outside the box) and the slopes' sigmoids
 * (SAVED_ROWS values). The backward then recomputes only the softmax and needs no search
 * and no log. (Saved in float32, xi alone would move float32 gradients by up to ~20 ulp:
 * the gradients' derivatives in xi scale with 1 / w^2.)
 *
 * Layout: elements form a grid of R rows (coordinates) by C columns (batch); every
 * tensor is addressed by element strides, so batch-minor parameters are read in place.
 * Columns are processed in tiles of TILE lanes stored structure-of-arrays ([row][lane]):
 * every inner loop runs over lanes, so the compiler vectorises it (exp and log through
 * glibc's vector math library where the build declares them SIMD).
 *
 * Built at first use by native_spline.py; not part of any Python import path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef NFX_SIMD_MATH
#pragma omp declare simd notinbranch
double exp(double);
#pragma omp declare simd notinbranch
double log(double);
#endif

#define TILE 32
#define INLINE static inline __attribute__((always_inline))
#define LANES _Pragma("omp simd") for (int j = 0; j < n; j++)
#define ROW(a, i) ((a) + (int64_t)(i) * TILE)

/* rows of the saved tensor */
enum { SV_XI, SV_W, SV_H, SV_D0, SV_D1, SV_BIN, SV_SG0, SV_SG1, SAVED_ROWS };

typedef struct {
    int K;           /* bins */
    double mw, mh;   /* floors of the bin widths / heights (fractions of the box) */
    double md;       /* floor of the slopes */
    double shift;    /* softplus shift: a zero parameter gives slope 1 */
    int inverse;
} spec_t;

typedef struct {
    double *u;   /* 3K - 1 rows: unconstrained parameters */
    double *p;   /* 2K rows: softmax of the widths, then of the heights */
    double *kn;  /* 2(K + 1) rows: x knots, then y knots */
    double *q;   /* K rows: backward scratch */
    double x[TILE], lo[TILE], hi[TILE], inside[TILE], xs[TILE], kf[TILE];
    double x0[TILE], x1[TILE], y0[TILE], y1[TILE];
    double s0[TILE], s1[TILE], d0[TILE], d1[TILE], nf[TILE], nl[TILE];
    double xi[TILE], w[TILE], h[TILE], sg0[TILE], sg1[TILE];
    double out[TILE], lad[TILE], gy[TILE], gl[TILE], tmp[TILE], tmp2[TILE];
} tile_t;

/* log(1 + e) for e >= 0, accurate also where 1 + e rounds to 1 (Goldberg's correction:
 * log(u) * e / (u - 1) with u = 1 + e), with log alone (which the vector library has). */
INLINE double log1p_pos(double e) {
    const double u = 1.0 + e;
    return u == 1.0 ? e : log(u) * e / (u - 1.0);
}

/* softplus(z) and its derivative sigmoid(z), from one exp: e = exp(-|z|). */
typedef struct { double value, slope; } softplus_t;

INLINE softplus_t softplus(double z) {
    const double e = exp(-fabs(z));
    const softplus_t r = {(z > 0 ? z : 0.0) + log1p_pos(e), (z >= 0 ? 1.0 : e) / (1.0 + e)};
    return r;
}

/* ------------------------------------------------------------------ strided I/O */
static void load(const void *base, int dbl, int64_t off, int64_t stride, int n, double *dst) {
    if (dbl) {
        const double *b = (const double *)base + off;
        LANES dst[j] = b[j * stride];
    } else {
        const float *b = (const float *)base + off;
        LANES dst[j] = (double)b[j * stride];
    }
}

static void store(void *base, int dbl, int64_t off, int64_t stride, int n, const double *src) {
    if (dbl) {
        double *b = (double *)base + off;
        LANES b[j * stride] = src[j];
    } else {
        float *b = (float *)base + off;
        LANES b[j * stride] = (float)src[j];
    }
}

/* ---------------------------------------------------- knots, bin, slopes (shared) */
/* Softmax of parameter rows half*K .. half*K + K - 1 into p (the widths, the heights). */
static void softmax(const spec_t *s, tile_t *t, int n, int half) {
    const int K = s->K;
    const double *u = ROW(t->u, half * K);
    double *p = ROW(t->p, half * K), *mx = t->tmp, *sum = t->tmp2;
    LANES mx[j] = u[j];
    for (int i = 1; i < K; i++) {
        const double *ui = ROW(u, i);
        LANES mx[j] = ui[j] > mx[j] ? ui[j] : mx[j];
    }
    LANES sum[j] = 0.0;
    for (int i = 0; i < K; i++) {
        const double *ui = ROW(u, i);
        double *pi = ROW(p, i);
        LANES { pi[j] = exp(ui[j] - mx[j]); sum[j] += pi[j]; }
    }
    LANES sum[j] = 1.0 / sum[j];
    for (int i = 0; i < K; i++) {
        double *pi = ROW(p, i);
        LANES pi[j] *= sum[j];
    }
}

/* Knots lo + W cumsum(m + a p) (a = 1 - m K) from the probabilities in p. */
static void knots(const spec_t *s, tile_t *t, int n, int half) {
    const int K = s->K;
    const double m = half ? s->mh : s->mw, a = 1.0 - m * K;
    const double *p = ROW(t->p, half * K);
    double *kn = ROW(t->kn, half * (K + 1)), *cum = t->tmp;
    LANES { cum[j] = 0.0; kn[j] = t->lo[j]; ROW(kn, K)[j] = t->hi[j]; }
    for (int i = 0; i + 1 < K; i++) {
        const double *pi = ROW(p, i);
        double *ki = ROW(kn, i + 1);
        LANES { cum[j] += m + a * pi[j]; ki[j] = t->lo[j] + (t->hi[j] - t->lo[j]) * cum[j]; }
    }
}

/* Knots (from the probabilities in p), the located bin (count of interior knots <= x),
 * its ends and slopes. */
static void locate(const spec_t *s, tile_t *t, int n) {
    const int K = s->K;
    knots(s, t, n, 0);
    knots(s, t, n, 1);
    const double *xk = t->kn, *yk = ROW(t->kn, K + 1), *src = s->inverse ? yk : xk;
    LANES {
        const double x = t->x[j];
        t->inside[j] = (x >= t->lo[j] && x <= t->hi[j]) ? 1.0 : 0.0;
        t->xs[j] = t->inside[j] != 0.0 ? x : t->lo[j];  /* sanitised input (also NaN) */
        t->kf[j] = 0.0;
    }
    for (int i = 1; i < K; i++) {
        const double *si = ROW(src, i);
        LANES t->kf[j] += t->xs[j] >= si[j] ? 1.0 : 0.0;
    }
    LANES { t->x0[j] = t->x1[j] = t->y0[j] = t->y1[j] = t->s0[j] = t->s1[j] = 0.0; }
    for (int i = 0; i < K; i++) {
        const double *xa = ROW(xk, i), *xb = ROW(xk, i + 1), *ya = ROW(yk, i), *yb = ROW(yk, i + 1);
        LANES {
            const int sel = t->kf[j] == (double)i;
            t->x0[j] = sel ? xa[j] : t->x0[j];
            t->x1[j] = sel ? xb[j] : t->x1[j];
            t->y0[j] = sel ? ya[j] : t->y0[j];
            t->y1[j] = sel ? yb[j] : t->y1[j];
        }
    }
    /* slopes: interior knot i + 1 has parameter row 2K + i; softplus shifted so that a
     * zero parameter gives slope 1 */
    for (int i = 0; i + 1 < K; i++) {
        const double *ud = ROW(t->u, 2 * K + i);
        LANES {
            t->s0[j] = t->kf[j] == (double)(i + 1) ? ud[j] + s->shift : t->s0[j];
            t->s1[j] = t->kf[j] == (double)i ? ud[j] + s->shift : t->s1[j];
        }
    }
    LANES {
        t->nf[j] = t->kf[j] >= 1.0 ? 1.0 : 0.0;
        t->nl[j] = t->kf[j] <= K - 2.0 ? 1.0 : 0.0;
        const softplus_t sp0 = softplus(t->s0[j]), sp1 = softplus(t->s1[j]);
        t->d0[j] = t->nf[j] != 0.0 ? s->md + sp0.value : 1.0;
        t->d1[j] = t->nl[j] != 0.0 ? s->md + sp1.value : 1.0;
        t->sg0[j] = t->nf[j] * sp0.slope;  /* d slope / d parameter (0 at a boundary) */
        t->sg1[j] = t->nl[j] * sp1.slope;
    }
}

/* ------------------------------------------------------------- the map in one bin */
/* y (clamped into the bin: rounding must not leave it) and the log-slope at bin
 * coordinate xi in [0, 1] of a bin of width w, height h, end slopes d0, d1 (eq. 4). */
INLINE void rq_forward(double xi, double y0, double y1, double w, double h, double d0,
                       double d1, double *y, double *lad) {
    const double s = h / w, t = xi * (1 - xi), c2 = d1 + d0 - 2 * s, den = s + c2 * t;
    const double num_y = s * xi * xi + d0 * t;
    double v = y0 + h * num_y / den;
    v = v < y0 ? y0 : v;
    *y = v > y1 ? y1 : v;
    const double num = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) * (1 - xi);
    *lad = log(s * s * num / (den * den));
}

/* The bin coordinate xi of the preimage of y (appendix A, the stable root). */
INLINE double rq_inverse_xi(double ys, double y0, double h, double s, double d0, double d1) {
    const double dy = ys - y0, c2 = d1 + d0 - 2 * s;
    const double a = h * (s - d0) + dy * c2, b = h * d0 - dy * c2, c = -s * dy;
    const double disc = b * b - 4 * a * c;
    const double root = sqrt(disc > 0 ? disc : 0.0);
    /* 2c / (-b - root) for b >= 0, (root - b) / (2a) for b < 0: each free of cancellation */
    const int pos = b >= 0;
    double dr = pos ? -b - root : -1.0;
    dr = dr == 0 ? -1e-30 : dr;
    const double as = pos ? 1.0 : a;
    const double xi = pos ? 2 * c / dr : (root - b) / (2 * as);
    return xi < 0 ? 0.0 : (xi > 1 ? 1.0 : xi);
}

/* Gradient of gy * y + gl * lad of the forward map at bin coordinate xi w.r.t. (x, x0, x1,
 * y0, y1, d0, d1) (splines.py: _rq_partials), and the slope dy/dx and dlad/dx. */
typedef struct { double x, x0, x1, y0, y1, d0, d1, slope, lad_x; } partials_t;

INLINE partials_t rq_partials(double xi, double w, double h, double d0, double d1, double gy,
                              double gl) {
    const double s = h / w, omx = 1 - xi;
    const double t = xi * omx, c2 = d1 + d0 - 2 * s, den = s + c2 * t;
    const double num_y = s * xi * xi + d0 * t;
    const double num = d1 * xi * xi + 2 * s * t + d0 * omx * omx;
    const double inv_den = 1 / den, inv_num = 1 / num, r = num_y * inv_den;
    const double one_m2xi = omx - xi, den_xi = c2 * one_m2xi;
    const double r_xi = (2 * s * xi + d0 * one_m2xi - r * den_xi) * inv_den;
    const double r_s = (xi * xi - r * (1 - 2 * t)) * inv_den;
    const double r_d0 = t * (1 - r) * inv_den, r_d1 = -r * t * inv_den;
    const double l_xi = (2 * d1 * xi + 2 * s * one_m2xi - 2 * d0 * omx) * inv_num
                        - 2 * den_xi * inv_den;
    const double l_s = 2 / s + 2 * t * inv_num - 2 * (1 - 2 * t) * inv_den;
    const double two_t_den = 2 * t * inv_den;
    const double l_d0 = omx * omx * inv_num - two_t_den, l_d1 = xi * xi * inv_num - two_t_den;
    const double gyh = gy * h, g_xi = gyh * r_xi + gl * l_xi, g_s = gyh * r_s + gl * l_s;
    const double inv_w = 1 / w, g_h = gy * r + g_s * inv_w, g_w = -(g_s * s + g_xi * xi) * inv_w;
    partials_t p;
    p.x = g_xi * inv_w;
    p.x0 = -p.x - g_w;
    p.x1 = g_w;
    p.y0 = gy - g_h;
    p.y1 = g_h;
    p.d0 = gyh * r_d0 + gl * l_d0;
    p.d1 = gyh * r_d1 + gl * l_d1;
    p.slope = h * r_xi * inv_w;
    p.lad_x = l_xi * inv_w;
    return p;
}

/* One lane of the forward: the map inside the located bin, the identity outside; keeps
 * the bin coordinate, width and height for the saved tensor. */
INLINE void eval_lane(tile_t *t, int j, const int inverse) {
    const double w = t->x1[j] - t->x0[j], h = t->y1[j] - t->y0[j];
    const double in = t->inside[j], d0 = t->d0[j], d1 = t->d1[j];
    double xi, y, lad;
    if (inverse) {
        xi = rq_inverse_xi(t->xs[j], t->y0[j], h, h / w, d0, d1);
        double v = t->x0[j] + xi * w, ignored;
        v = v < t->x0[j] ? t->x0[j] : v;
        y = v > t->x1[j] ? t->x1[j] : v;
        rq_forward(xi, t->y0[j], t->y1[j], w, h, d0, d1, &ignored, &lad);
        lad = -lad;
    } else {
        xi = (t->xs[j] - t->x0[j]) / w;
        rq_forward(xi, t->y0[j], t->y1[j], w, h, d0, d1, &y, &lad);
    }
    t->out[j] = in != 0.0 ? y : t->x[j];
    t->lad[j] = in != 0.0 ? lad : 0.0;
    t->xi[j] = xi;
    t->w[j] = w;
    t->h[j] = h;
}

/* One lane of the backward: gradients w.r.t. the input, the bin ends and the slopes. */
INLINE void vjp_lane(const tile_t *t, int j, const int inverse, double *g_in,
                     double gk[4][TILE], double *g_d0, double *g_d1) {
    const double in = t->inside[j];
    const double gy = in != 0.0 ? t->gy[j] : 0.0, gl = in != 0.0 ? t->gl[j] : 0.0;
    const double xi = t->xi[j], w = t->w[j], h = t->h[j], d0 = t->d0[j], d1 = t->d1[j];
    partials_t p;
    if (inverse) {
        /* implicit function theorem at x = f^-1(y): dx/dy = 1 / f_x,
         * dx/dtheta = -f_theta / f_x, lad_inv = -lad(x) */
        const partials_t z = rq_partials(xi, w, h, d0, d1, 0.0, 0.0);
        const double g = (gy - gl * z.lad_x) / z.slope;
        p = rq_partials(xi, w, h, d0, d1, -g, -gl);
        p.x = g;
    } else {
        p = rq_partials(xi, w, h, d0, d1, gy, gl);
    }
    g_in[j] = in != 0.0 ? p.x : t->gy[j];
    gk[0][j] = p.x0; gk[1][j] = p.x1; gk[2][j] = p.y0; gk[3][j] = p.y1;
    g_d0[j] = p.d0 * t->sg0[j];  /* softplus' = sigmoid (0 for a boundary slope) */
    g_d1[j] = p.d1 * t->sg1[j];
}

/* ------------------------------------------------------------------- entry points */
typedef struct {
    int64_t R, C;                        /* grid */
    const void *x; int64_t sxr, sxc;     /* input (output y for the inverse) */
    const void *u; int64_t suk, sur, suc;
    const void *low, *high; int64_t slr, shr; /* per row */
    const void *gy, *gl; int64_t sgyr, sgyc, sglr, sglc;
    void *y, *lad; int64_t syr, syc;     /* forward outputs */
    void *gx; int64_t sgxr, sgxc;        /* backward outputs */
    void *gu; int64_t sguk, sgur, sguc;
    void *sv; int64_t svk, svr, svc;     /* saved (double): written by the forward (unless
                                            NULL), read by the backward */
} io_t;

static tile_t *tile_new(int K) {
    tile_t *t = malloc(sizeof(tile_t));
    double *rows = malloc(sizeof(double) * TILE * (size_t)((3 * K - 1) + 2 * K + 2 * (K + 1) + K));
    if (!t || !rows) { free(t); free(rows); return NULL; }
    t->u = rows;
    t->p = ROW(t->u, 3 * K - 1);
    t->kn = ROW(t->p, 2 * K);
    t->q = ROW(t->kn, 2 * (K + 1));
    return t;
}

static void tile_free(tile_t *t) { if (t) { free(t->u); free(t); } }

/* Row and first column of the i-th tile. Batch-minor parameters (rows of a coordinate's
 * parameters contiguous) are swept a row at a time, streaming through memory; others a
 * column tile at a time, whose rows then share cache lines. */
static void tile_at(const io_t *io, int64_t tiles, int64_t i, int64_t *r, int64_t *c0) {
    const int rows_outer = io->suc == 1;
    *r = rows_outer ? i / tiles : i % io->R;
    *c0 = (rows_outer ? i % tiles : i / io->R) * TILE;
}

/* The saved rows of one tile (double): from the tile (forward) or into it (backward). */
static void saved_io(const io_t *io, tile_t *t, int64_t r, int64_t c0,
                     int n, int write) {
    double *rows[SAVED_ROWS] = {t->xi, t->w, t->h, t->d0, t->d1, t->tmp, t->sg0, t->sg1};
    if (write)
        LANES t->tmp[j] = t->inside[j] != 0.0 ? t->kf[j] : -1.0;
    for (int k = 0; k < SAVED_ROWS; k++) {
        const int64_t off = k * io->svk + r * io->svr + c0 * io->svc;
        if (write)
            store(io->sv, 1, off, io->svc, n, rows[k]);
        else
            load(io->sv, 1, off, io->svc, n, rows[k]);
    }
    if (!write)
        LANES {
            t->inside[j] = t->tmp[j] >= 0.0 ? 1.0 : 0.0;
            t->kf[j] = t->tmp[j] >= 0.0 ? t->tmp[j] : 0.0;  /* outside: no gradient anyway */
        }
}

/* y, lad of the spline (inverse: x, lad of the inverse) and, if io->sv, what the backward
 * needs. Returns 0, or -1 if out of memory. */
int nfx_rq_forward(int dbl, int K, double mw, double mh, double md, int inverse, const io_t *io) {
    const spec_t s = {K, mw, mh, md, log(expm1(1.0 - md)), inverse};
    tile_t *t = tile_new(K);
    if (!t) return -1;
    const int64_t tiles = (io->C + TILE - 1) / TILE;
    for (int64_t i = 0; i < io->R * tiles; i++) {
        int64_t r, c0;
        tile_at(io, tiles, i, &r, &c0);
        const int n = io->C - c0 < TILE ? (int)(io->C - c0) : TILE;
        for (int k = 0; k < 3 * K - 1; k++)
            load(io->u, dbl, k * io->suk + r * io->sur + c0 * io->suc, io->suc, n, ROW(t->u, k));
        load(io->x, dbl, r * io->sxr + c0 * io->sxc, io->sxc, n, t->x);
        load(io->low, dbl, r * io->slr, 0, n, t->lo);
        load(io->high, dbl, r * io->shr, 0, n, t->hi);
        softmax(&s, t, n, 0);
        softmax(&s, t, n, 1);
        locate(&s, t, n);
        if (inverse)
            LANES eval_lane(t, j, 1);
        else
            LANES eval_lane(t, j, 0);
        store(io->y, dbl, r * io->syr + c0 * io->syc, io->syc, n, t->out);
        store(io->lad, dbl, r * io->syr + c0 * io->syc, io->syc, n, t->lad);
        if (io->sv)
            saved_io(io, t, r, c0, n, 1);
    }
    tile_free(t);
    return 0;
}

/* Gradients w.r.t. the input and the parameters of gy * y + gl * lad (the VJP), from the
 * tensor saved by the forward. Returns 0, or -1 if out of memory. */
int nfx_rq_backward(int dbl, int K, double mw, double mh, double md, int inverse, const io_t *io) {
    const spec_t s = {K, mw, mh, md, 0.0, inverse};
    tile_t *t = tile_new(K);
    if (!t) return -1;
    double g_in[TILE], gk[4][TILE], g_d0[TILE], g_d1[TILE];
    const int64_t tiles = (io->C + TILE - 1) / TILE;
    for (int64_t i = 0; i < io->R * tiles; i++) {
        int64_t r, c0;
        tile_at(io, tiles, i, &r, &c0);
        const int n = io->C - c0 < TILE ? (int)(io->C - c0) : TILE;
        saved_io(io, t, r, c0, n, 0);
        for (int k = 0; k < 2 * K; k++)
            load(io->u, dbl, k * io->suk + r * io->sur + c0 * io->suc, io->suc, n, ROW(t->u, k));
        softmax(&s, t, n, 0);
        softmax(&s, t, n, 1);
        load(io->low, dbl, r * io->slr, 0, n, t->lo);
        load(io->high, dbl, r * io->shr, 0, n, t->hi);
        load(io->gy, dbl, r * io->sgyr + c0 * io->sgyc, io->sgyc, n, t->gy);
        load(io->gl, dbl, r * io->sglr + c0 * io->sglc, io->sglc, n, t->gl);
        if (inverse)
            LANES vjp_lane(t, j, 1, g_in, gk, g_d0, g_d1);
        else
            LANES vjp_lane(t, j, 0, g_in, gk, g_d0, g_d1);
        store(io->gx, dbl, r * io->sgxr + c0 * io->sgxc, io->sgxc, n, g_in);
        /* knot j (1..K-1) = lo + W sum_{i<j} (m + a p_i): the bin ends k and k + 1 give
         * dL/dp_i = a W (g_lo [i < k] + g_hi [i <= k] [k + 1 < K]); then the softmax VJP */
        for (int half = 0; half < 2; half++) {
            const double m = half ? s.mh : s.mw, a = 1.0 - m * K;
            const double *glo = gk[2 * half], *ghi = gk[2 * half + 1];
            const double *p = ROW(t->p, half * K);
            double *dot = t->tmp;
            LANES dot[j] = 0.0;
            for (int i = 0; i < K; i++) {
                const double *pi = ROW(p, i);
                double *qi = ROW(t->q, i);
                LANES {
                    const double aw = a * (t->hi[j] - t->lo[j]);
                    const double hi_ok = t->kf[j] <= K - 2.0 ? ghi[j] : 0.0;  /* knot K is fixed */
                    const double g = (i < t->kf[j] ? glo[j] : 0.0) + (i <= t->kf[j] ? hi_ok : 0.0);
                    qi[j] = g * aw * pi[j];
                    dot[j] += qi[j];
                }
            }
            for (int i = 0; i < K; i++) {
                const double *pi = ROW(p, i);
                double *qi = ROW(t->q, i);
                LANES qi[j] -= pi[j] * dot[j];
                store(io->gu, dbl, (half * K + i) * io->sguk + r * io->sgur + c0 * io->sguc,
                      io->sguc, n, qi);
            }
        }
        for (int i = 0; i + 1 < K; i++) {
            double *qi = t->tmp;
            LANES qi[j] = (t->kf[j] == (double)(i + 1) ? g_d0[j] : 0.0)
                          + (t->kf[j] == (double)i ? g_d1[j] : 0.0);
            store(io->gu, dbl, (2 * K + i) * io->sguk + r * io->sgur + c0 * io->sguc,
                  io->sguc, n, qi);
        }
    }
    tile_free(t);
    return 0;
}
