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
 * Columns are processed in tiles of TILE lanes, loaded structure-of-arrays ([row][lane])
 * in double precision; the arithmetic then runs on V lanes at a time in vector registers
 * (GCC / Clang vector extensions), each element's knots, bin search and map in one pass
 * whose values stay in registers (exp and log through glibc's vector math library where
 * the build declares them SIMD).
 *
 * Built at first use by native_spline.py; not part of any Python import path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* One tile: TILE lanes of every per-element row, in double precision. */
typedef struct {
    double *u;   /* 3K - 1 rows: unconstrained parameters */
    double *e;   /* 2K rows: exp(u - max) of the widths, then of the heights */
    double *gu;  /* 3K - 1 rows: gradient w.r.t. u (backward) */
    double x[TILE], lo[TILE], hi[TILE], gy[TILE], gl[TILE], out[TILE], lad[TILE];
    double sv_rows[SAVED_ROWS][TILE];
    double *sv[SAVED_ROWS];  /* the saved rows (enum above): the saved tensor's own memory
                                for a whole tile of unit stride, else sv_rows */
} tile_t;

/* ------------------------------------------------------------------ vector lanes */
/* Lanes per vector: as many doubles as the target's vector registers hold (AVX-512: 8,
 * AVX: 4, else 2), so that a step's values stay in registers; a wider type would be
 * split into register pairs and spilled (2-3x slower on AVX2). */
#if defined(__AVX512F__)
#define V 8
#elif defined(__AVX__)
#define V 4
#else
#define V 2
#endif
_Static_assert(TILE % V == 0, "a tile holds whole vectors (partial tiles stay in bounds)");
typedef double vd __attribute__((vector_size(V * 8)));
/* masks: -1 true, 0 false; long long, the type of a comparison's result in both GCC and
 * Clang (Clang rejects int64_t, which is long, under -flax-vector-conversions=none) */
typedef long long vl __attribute__((vector_size(V * 8)));
typedef double vdu __attribute__((vector_size(V * 8), aligned(8)));

INLINE vd vload(const double *p) { return *(const vdu *)p; }
INLINE void vstore(double *p, vd v) { *(vdu *)p = v; }
INLINE vd vsplat(double a) { const vd z = {0}; return z + a; }
/* m ? a : b, lane by lane */
INLINE vd vsel(vl m, vd a, vd b) { return (vd)(((vl)a & m) | ((vl)b & ~m)); }

/* exp, log and sqrt lane by lane: a loop the compiler turns into vector calls (or
 * instructions) where the build allows */
#define LANEWISE(name, fn)                                              \
    INLINE vd name(vd v) {                                              \
        double a[V], r[V];                                              \
        vstore(a, v);                                                   \
        _Pragma("omp simd") for (int j = 0; j < V; j++) r[j] = fn(a[j]); \
        return vload(r);                                                \
    }
LANEWISE(vexp, exp)
LANEWISE(vlog, log)
LANEWISE(vsqrt, sqrt)

/* log(1 + e) for e >= 0, accurate also where 1 + e rounds to 1 (Goldberg's correction:
 * log(u) * e / (u - 1) with u = 1 + e), with log alone (which the vector library has). */
INLINE vd log1p_pos(vd e) {
    const vd u = 1.0 + e;
    return vsel(u == 1.0, e, vlog(u) * e / (u - 1.0));
}

/* softplus(z) and its derivative sigmoid(z), from one exp: e = exp(-|z|). */
typedef struct { vd value, slope; } softplus_t;

INLINE softplus_t softplus(vd z) {
    const vd zero = vsplat(0.0), e = vexp(-vsel(z < 0.0, -z, z));
    const softplus_t r = {vsel(z > 0.0, z, zero) + log1p_pos(e),
                          vsel(z >= 0.0, vsplat(1.0), e) / (1.0 + e)};
    return r;
}

/* ---------------------------------------------------- knots, bin, slopes (shared) */
/* exp(u - max u) of parameter rows half*K .. half*K + K - 1 of lanes j0.. into t->e;
 * returns 1 / sum: the softmax is e * (1 / sum). */
INLINE vd softmax(const tile_t *t, int K, int half, int j0) {
    const double *u = ROW(t->u, half * K) + j0;
    double *e = ROW(t->e, half * K) + j0;
    vd mx = vload(u);
    for (int i = 1; i < K; i++) {
        const vd ui = vload(ROW(u, i));
        mx = vsel(ui > mx, ui, mx);
    }
    vd sum = vsplat(0.0);
    for (int i = 0; i < K; i++) {
        const vd ei = vexp(vload(ROW(u, i)) - mx);
        vstore(ROW(e, i), ei);
        sum += ei;
    }
    return 1.0 / sum;
}

/* The located bin of lanes j0..: its ends, slopes and index (the count of interior knots
 * <= the input), the sanitised input and the box flag. */
typedef struct { vd x0, x1, y0, y1, d0, d1, sg0, sg1, kf, xs; vl inside; } bin_t;

/* Knots lo + W cumsum(m + a p) (a = 1 - m K), both halves in one pass, with the bin
 * search and the gathers of the bin's ends and slope parameters on the way. The floors
 * m are >= 0 (the callers check), so the knots never decrease: the last knot <= the
 * input is the count-th, and the gathered bin is the counted one. */
INLINE bin_t locate(const spec_t *s, const int K, const tile_t *t, int j0, vd x) {
    const double mw = s->mw, aw = 1.0 - mw * K, mh = s->mh, ah = 1.0 - mh * K;
    const vd zero = vsplat(0.0), one = vsplat(1.0);
    const vd lo = vload(t->lo + j0), hi = vload(t->hi + j0), W = hi - lo;
    const vd inv_x = softmax(t, K, 0, j0), inv_y = softmax(t, K, 1, j0);
    const double *ex = ROW(t->e, 0) + j0, *ey = ROW(t->e, K) + j0, *ud = ROW(t->u, 2 * K) + j0;
    bin_t b;
    b.inside = (x >= lo) & (x <= hi);
    b.xs = vsel(b.inside, x, lo);  /* sanitised input (also NaN) */
    vd cx = zero, cy = zero, kx = lo, ky = lo, s0 = zero, s1 = zero;
    b.x0 = b.y0 = lo;
    b.x1 = b.y1 = hi;
    b.kf = zero;
    /* bin i runs from knot i (kx, ky) to knot i + 1 (nx, ny); interior knot i + 1 has
     * slope parameter row 2K + i, softplus-shifted so that a zero parameter gives 1 */
    for (int i = 0; i < K; i++) {
        vd nx = hi, ny = hi;
        if (i + 1 < K) {
            cx += mw + aw * (vload(ROW(ex, i)) * inv_x);
            cy += mh + ah * (vload(ROW(ey, i)) * inv_y);
            nx = lo + W * cx;
            ny = lo + W * cy;
        }
        const vd right = i + 1 < K ? vload(ROW(ud, i)) + s->shift : zero;
        if (i == 0) {
            b.x1 = nx; b.y1 = ny; s1 = right;
        } else {
            const vl c = (s->inverse ? ky : kx) <= b.xs;
            b.kf += vsel(c, one, zero);
            b.x0 = vsel(c, kx, b.x0); b.x1 = vsel(c, nx, b.x1);
            b.y0 = vsel(c, ky, b.y0); b.y1 = vsel(c, ny, b.y1);
            s0 = vsel(c, vload(ROW(ud, i - 1)) + s->shift, s0);
            s1 = vsel(c, right, s1);
        }
        kx = nx; ky = ny;
    }
    const vl nf = b.kf >= 1.0, nl = b.kf <= K - 2.0;
    const softplus_t sp0 = softplus(s0), sp1 = softplus(s1);
    b.d0 = vsel(nf, s->md + sp0.value, one);
    b.d1 = vsel(nl, s->md + sp1.value, one);
    b.sg0 = vsel(nf, sp0.slope, zero);  /* d slope / d parameter (0 at a boundary) */
    b.sg1 = vsel(nl, sp1.slope, zero);
    return b;
}

/* ------------------------------------------------------------- the map in one bin */
/* y (clamped into the bin: rounding must not leave it) and the log-slope at bin
 * coordinate xi in [0, 1] of a bin of width w, height h, end slopes d0, d1 (eq. 4). */
INLINE void rq_forward(vd xi, vd y0, vd y1, vd w, vd h, vd d0, vd d1, vd *y, vd *lad) {
    const vd s = h / w, t = xi * (1 - xi), c2 = d1 + d0 - 2 * s, den = s + c2 * t;
    const vd num_y = s * xi * xi + d0 * t;
    vd v = y0 + h * num_y / den;
    v = vsel(v < y0, y0, v);
    *y = vsel(v > y1, y1, v);
    const vd num = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) * (1 - xi);
    *lad = vlog(s * s * num / (den * den));
}

/* The bin coordinate xi of the preimage of y (appendix A, the stable root). */
INLINE vd rq_inverse_xi(vd ys, vd y0, vd h, vd s, vd d0, vd d1) {
    const vd dy = ys - y0, c2 = d1 + d0 - 2 * s;
    const vd a = h * (s - d0) + dy * c2, b = h * d0 - dy * c2, c = -s * dy;
    const vd disc = b * b - 4 * a * c;
    const vd root = vsqrt(vsel(disc > 0, disc, vsplat(0.0)));
    /* 2c / (-b - root) for b >= 0, (root - b) / (2a) for b < 0: each free of cancellation */
    const vl pos = b >= 0;
    vd dr = vsel(pos, -b - root, vsplat(-1.0));
    dr = vsel(dr == 0, vsplat(-1e-30), dr);
    const vd as = vsel(pos, vsplat(1.0), a);
    const vd xi = vsel(pos, 2 * c / dr, (root - b) / (2 * as));
    return vsel(xi < 0, vsplat(0.0), vsel(xi > 1, vsplat(1.0), xi));
}

/* Gradient of gy * y + gl * lad of the forward map at bin coordinate xi w.r.t. (x, x0, x1,
 * y0, y1, d0, d1) (splines.py: _rq_partials), and the slope dy/dx and dlad/dx. */
typedef struct { vd x, x0, x1, y0, y1, d0, d1, slope, lad_x; } partials_t;

INLINE partials_t rq_partials(vd xi, vd w, vd h, vd d0, vd d1, vd gy, vd gl) {
    const vd s = h / w, omx = 1 - xi;
    const vd t = xi * omx, c2 = d1 + d0 - 2 * s, den = s + c2 * t;
    const vd num_y = s * xi * xi + d0 * t;
    const vd num = d1 * xi * xi + 2 * s * t + d0 * omx * omx;
    const vd inv_den = 1 / den, inv_num = 1 / num, r = num_y * inv_den;
    const vd one_m2xi = omx - xi, den_xi = c2 * one_m2xi;
    const vd r_xi = (2 * s * xi + d0 * one_m2xi - r * den_xi) * inv_den;
    const vd r_s = (xi * xi - r * (1 - 2 * t)) * inv_den;
    const vd r_d0 = t * (1 - r) * inv_den, r_d1 = -r * t * inv_den;
    const vd l_xi = (2 * d1 * xi + 2 * s * one_m2xi - 2 * d0 * omx) * inv_num
                    - 2 * den_xi * inv_den;
    const vd l_s = 2 / s + 2 * t * inv_num - 2 * (1 - 2 * t) * inv_den;
    const vd two_t_den = 2 * t * inv_den;
    const vd l_d0 = omx * omx * inv_num - two_t_den, l_d1 = xi * xi * inv_num - two_t_den;
    const vd gyh = gy * h, g_xi = gyh * r_xi + gl * l_xi, g_s = gyh * r_s + gl * l_s;
    const vd inv_w = 1 / w, g_h = gy * r + g_s * inv_w, g_w = -(g_s * s + g_xi * xi) * inv_w;
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

/* ------------------------------------------------------------ V lanes of a tile */
/* The forward of lanes j0..j0 + V - 1: the map inside the located bin, the identity
 * outside, and the saved rows. */
INLINE void forward_lanes(const spec_t *s, const int K, tile_t *t, int j0, const int inverse) {
    const vd x = vload(t->x + j0), zero = vsplat(0.0);
    const bin_t b = locate(s, K, t, j0, x);
    const vd w = b.x1 - b.x0, h = b.y1 - b.y0;
    vd xi, y, lad;
    if (inverse) {
        xi = rq_inverse_xi(b.xs, b.y0, h, h / w, b.d0, b.d1);
        vd v = b.x0 + xi * w, ignored;
        v = vsel(v < b.x0, b.x0, v);
        y = vsel(v > b.x1, b.x1, v);
        rq_forward(xi, b.y0, b.y1, w, h, b.d0, b.d1, &ignored, &lad);
        lad = -lad;
    } else {
        xi = (b.xs - b.x0) / w;
        rq_forward(xi, b.y0, b.y1, w, h, b.d0, b.d1, &y, &lad);
    }
    vstore(t->out + j0, vsel(b.inside, y, x));
    vstore(t->lad + j0, vsel(b.inside, lad, zero));
    const vd saved[SAVED_ROWS] = {xi, w, h, b.d0, b.d1, vsel(b.inside, b.kf, vsplat(-1.0)),
                                  b.sg0, b.sg1};
    for (int k = 0; k < SAVED_ROWS; k++)
        vstore(t->sv[k] + j0, saved[k]);
}

/* The backward of lanes j0..j0 + V - 1 from the saved rows: the gradient w.r.t. the
 * input into g_in, w.r.t. the parameters into t->gu. */
INLINE void backward_lanes(const spec_t *s, const int K, tile_t *t, int j0, const int inverse,
                           double *g_in) {
    const vd zero = vsplat(0.0);
    const vd bin = vload(t->sv[SV_BIN] + j0);
    const vl in = bin >= 0.0;
    const vd kf = vsel(in, bin, zero);  /* outside: no gradient anyway */
    const vd gy_in = vload(t->gy + j0), gy = vsel(in, gy_in, zero);
    const vd gl = vsel(in, vload(t->gl + j0), zero);
    const vd xi = vload(t->sv[SV_XI] + j0), w = vload(t->sv[SV_W] + j0);
    const vd h = vload(t->sv[SV_H] + j0), d0 = vload(t->sv[SV_D0] + j0);
    const vd d1 = vload(t->sv[SV_D1] + j0);
    partials_t p;
    if (inverse) {
        /* implicit function theorem at x = f^-1(y): dx/dy = 1 / f_x,
         * dx/dtheta = -f_theta / f_x, lad_inv = -lad(x) */
        const partials_t z = rq_partials(xi, w, h, d0, d1, zero, zero);
        const vd g = (gy - gl * z.lad_x) / z.slope;
        p = rq_partials(xi, w, h, d0, d1, -g, -gl);
        p.x = g;
    } else {
        p = rq_partials(xi, w, h, d0, d1, gy, gl);
    }
    vstore(g_in + j0, vsel(in, p.x, gy_in));
    /* knot j (1..K-1) = lo + W sum_{i<j} (m + a p_i): the bin ends k and k + 1 give
     * dL/dp_i = a W (g_lo [i < k] + g_hi [i <= k] [k + 1 < K]); then the softmax VJP */
    const vd W = vload(t->hi + j0) - vload(t->lo + j0);
    const vd g_lo[2] = {p.x0, p.y0};
    const vd g_hi[2] = {vsel(kf <= K - 2.0, p.x1, zero), vsel(kf <= K - 2.0, p.y1, zero)};
    for (int half = 0; half < 2; half++) {
        const double m = half ? s->mh : s->mw, a = 1.0 - m * K;
        const vd aw = a * W, inv = softmax(t, K, half, j0);
        const double *e = ROW(t->e, half * K) + j0;
        double *q = ROW(t->gu, half * K) + j0;
        vd dot = zero;
        for (int i = 0; i < K; i++) {
            const vd g = vsel(kf > (double)i, g_lo[half], zero)
                         + vsel(kf >= (double)i, g_hi[half], zero);
            const vd qi = g * aw * (vload(ROW(e, i)) * inv);
            vstore(ROW(q, i), qi);
            dot += qi;
        }
        for (int i = 0; i < K; i++)
            vstore(ROW(q, i), vload(ROW(q, i)) - (vload(ROW(e, i)) * inv) * dot);
    }
    /* softplus' = sigmoid (0 for a boundary slope) */
    const vd g_d0 = p.d0 * vload(t->sv[SV_SG0] + j0), g_d1 = p.d1 * vload(t->sv[SV_SG1] + j0);
    for (int i = 0; i + 1 < K; i++)
        vstore(ROW(t->gu, 2 * K + i) + j0, vsel(kf == (double)(i + 1), g_d0, zero)
                                           + vsel(kf == (double)i, g_d1, zero));
}

/* ------------------------------------------------------------------ strided I/O */
/* n lanes from memory into a tile row; lanes n..TILE-1 get 0 (a partial tile's vectors
 * then compute on defined values, which are never stored). */
static void load(const void *base, int dbl, int64_t off, int64_t stride, int n, double *dst) {
    if (dbl) {
        const double *b = (const double *)base + off;
        LANES dst[j] = b[j * stride];
    } else {
        const float *b = (const float *)base + off;
        LANES dst[j] = (double)b[j * stride];
    }
    if (n < TILE)
        memset(dst + n, 0, sizeof(double) * (size_t)(TILE - n));
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
    double *rows = malloc(sizeof(double) * TILE * (size_t)(2 * (3 * K - 1) + 2 * K));
    if (!t || !rows) { free(t); free(rows); return NULL; }
    t->u = rows;
    t->e = ROW(t->u, 3 * K - 1);
    t->gu = ROW(t->e, 2 * K);
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

/* Point the tile's saved rows at the saved tensor (a whole tile of unit stride: the
 * lanes read and write it in place) or at its scratch rows (a partial tile, or no saved
 * tensor); returns whether scratch. */
static int saved_rows(const io_t *io, tile_t *t, int64_t r, int64_t c0, int n) {
    const int direct = io->sv && n == TILE && io->svc == 1;
    for (int k = 0; k < SAVED_ROWS; k++)
        t->sv[k] = direct ? (double *)io->sv + k * io->svk + r * io->svr + c0 : t->sv_rows[k];
    return !direct;
}

/* The scratch saved rows of one tile from the tile (forward) or into it (backward). */
static void saved_io(const io_t *io, tile_t *t, int64_t r, int64_t c0, int n, int write) {
    for (int k = 0; k < SAVED_ROWS; k++) {
        const int64_t off = k * io->svk + r * io->svr + c0 * io->svc;
        if (write)
            store(io->sv, 1, off, io->svc, n, t->sv_rows[k]);
        else
            load(io->sv, 1, off, io->svc, n, t->sv_rows[k]);
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
        const int scratch = saved_rows(io, t, r, c0, n);
        for (int j0 = 0; j0 < n; j0 += V) {
            /* the default bin count as a constant: its loops unroll */
            if (K == 8 && inverse)
                forward_lanes(&s, 8, t, j0, 1);
            else if (K == 8)
                forward_lanes(&s, 8, t, j0, 0);
            else if (inverse)
                forward_lanes(&s, K, t, j0, 1);
            else
                forward_lanes(&s, K, t, j0, 0);
        }
        store(io->y, dbl, r * io->syr + c0 * io->syc, io->syc, n, t->out);
        store(io->lad, dbl, r * io->syr + c0 * io->syc, io->syc, n, t->lad);
        if (io->sv && scratch)
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
    double g_in[TILE];
    const int64_t tiles = (io->C + TILE - 1) / TILE;
    for (int64_t i = 0; i < io->R * tiles; i++) {
        int64_t r, c0;
        tile_at(io, tiles, i, &r, &c0);
        const int n = io->C - c0 < TILE ? (int)(io->C - c0) : TILE;
        if (saved_rows(io, t, r, c0, n))
            saved_io(io, t, r, c0, n, 0);
        for (int k = 0; k < 2 * K; k++)
            load(io->u, dbl, k * io->suk + r * io->sur + c0 * io->suc, io->suc, n, ROW(t->u, k));
        load(io->low, dbl, r * io->slr, 0, n, t->lo);
        load(io->high, dbl, r * io->shr, 0, n, t->hi);
        load(io->gy, dbl, r * io->sgyr + c0 * io->sgyc, io->sgyc, n, t->gy);
        load(io->gl, dbl, r * io->sglr + c0 * io->sglc, io->sglc, n, t->gl);
        for (int j0 = 0; j0 < n; j0 += V) {
            if (K == 8 && inverse)
                backward_lanes(&s, 8, t, j0, 1, g_in);
            else if (K == 8)
                backward_lanes(&s, 8, t, j0, 0, g_in);
            else if (inverse)
                backward_lanes(&s, K, t, j0, 1, g_in);
            else
                backward_lanes(&s, K, t, j0, 0, g_in);
        }
        store(io->gx, dbl, r * io->sgxr + c0 * io->sgxc, io->sgxc, n, g_in);
        for (int k = 0; k < 3 * K - 1; k++)
            store(io->gu, dbl, k * io->sguk + r * io->sgur + c0 * io->sguc, io->sguc, n,
                  ROW(t->gu, k));
    }
    tile_free(t);
    return 0;
}
