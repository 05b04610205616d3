/* One-pass CPU kernels behind outlierq.ops (loaded by native.py through ctypes).

Each function handles the rows [r0, r1) of a row-major x [M, N] (row stride `stride` elements) of
dtype 0 = float32, 1 = bfloat16, 2 = float16; the caller splits rows across threads. Every row is
read from memory once (bf16/fp16 are widened in registers or into a small L1-resident buffer that
the next passes over the row re-read). The arithmetic is the torch twins' (torch_ops.py), operation
for operation, so maxima, counts, scales and codes are bit-identical to them; only sums differ in
the order they add.

Written for gcc -O3 auto-vectorization (checked with -fopt-info-vec) and, for channel_stats, GCC
vector extensions: integer maxima (see channel_stats_rows), rintf (round half to even in the
default rounding mode, as torch.round) with -fno-math-errno. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bits_float(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static void load_row(const void *x, int dtype, int64_t off, int64_t n, float *buf) {
    if (dtype == 0) {
        memcpy(buf, (const float *)x + off, n * sizeof(float));
    } else if (dtype == 1) {
        const uint16_t *s = (const uint16_t *)x + off;
        uint32_t *u = (uint32_t *)buf;
        for (int64_t j = 0; j < n; j++) u[j] = (uint32_t)s[j] << 16;  /* bf16 = top half of f32 */
    } else {
        const _Float16 *s = (const _Float16 *)x + off;
        for (int64_t j = 0; j < n; j++) buf[j] = (float)s[j];
    }
}

/* Row r as float32 times inv_smooth (nullable): x itself where nothing needs converting. */
static const float *scaled_row(const void *x, int dtype, int64_t off, int64_t n, const float *inv_smooth,
                               float *buf) {
    if (dtype == 0 && !inv_smooth) return (const float *)x + off;
    load_row(x, dtype, off, n, buf);
    if (inv_smooth)
        for (int64_t j = 0; j < n; j++) buf[j] *= inv_smooth[j];
    return buf;
}

/* GCC vector extensions: 16 lanes of 32 bits, lowered to AVX-512, AVX2 (two halves) or NEON. */
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
#define LANES 16
#define ROWS 8 /* rows per block: column partials are loaded and stored once per ROWS rows */
#define AHEAD 512 /* elements: prefetch distance along each row (measured best of 256..2048) */

static inline u32x16 vmax(u32x16 a, u32x16 b) {
    u32x16 m = (u32x16)(a > b);
    return (a & m) | (b & ~m);
}

/* |x| as bits of 16 columns from j of a row (dtype 0: float32, 1: bfloat16) */
static inline __attribute__((always_inline)) u32x16 abs_bits(const void *row, int dtype, int64_t j) {
    u32x16 v;
    if (dtype == 0) {
        memcpy(&v, (const uint32_t *)row + j, sizeof v);
    } else {
        u16x16 h;
        memcpy(&h, (const uint16_t *)row + j, sizeof h);
        v = __builtin_convertvector(h, u32x16) << 16;  /* bf16 = top half of f32 */
    }
    return v & 0x7fffffffu;
}

/* R rows (pointers p) into the column partials, their maxima into rm[0..R). Each column adds its
   rows in row order, as the one-row-at-a-time loop would. */
static inline __attribute__((always_inline)) void stats_block(const void *const *p, const int R, const int dtype,
                                                             int64_t n, uint32_t *colmax, float *colsum,
                                                             uint32_t *rm) {
    u32x16 racc[ROWS];
    for (int r = 0; r < R; r++) racc[r] = (u32x16){0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        u32x16 cm;
        f32x16 cs;
        memcpy(&cm, colmax + j, sizeof cm);
        memcpy(&cs, colsum + j, sizeof cs);
        for (int r = 0; r < R; r++) {
            __builtin_prefetch((const char *)p[r] + (j + AHEAD) * (dtype == 0 ? 4 : 2));
            u32x16 v = abs_bits(p[r], dtype, j);
            cm = vmax(cm, v);
            racc[r] = vmax(racc[r], v);
            cs += (f32x16)v;
        }
        memcpy(colmax + j, &cm, sizeof cm);
        memcpy(colsum + j, &cs, sizeof cs);
    }
    for (int r = 0; r < R; r++) {
        uint32_t m = 0;
        for (int l = 0; l < LANES; l++) m = racc[r][l] > m ? racc[r][l] : m;
        rm[r] = m;
    }
    for (; j < n; j++)
        for (int r = 0; r < R; r++) {
            uint32_t v = dtype == 0 ? ((const uint32_t *)p[r])[j] & 0x7fffffffu
                                    : (uint32_t)(((const uint16_t *)p[r])[j] & 0x7fffu) << 16;
            colmax[j] = v > colmax[j] ? v : colmax[j];
            rm[r] = v > rm[r] ? v : rm[r];
            colsum[j] += bits_float(v);
        }
}

/* Per-channel max |x|, sum |x|, counts of |x| > thr[t] (into this part's own colmax, colsum,
   counts[t * n]), and per-row max |x| into rowmax[r].
   Maxima compare |x| as unsigned integers: for floats with the sign bit clear that order is the
   float order, and every NaN sorts above +inf, so a NaN propagates as torch.amax's does while the
   loop still vectorizes (a float max reduction would not, without fast-math). Rows go in blocks of
   ROWS so that the column partials stay in registers across them.
   buf: ROWS * n floats (float16 rows are converted there first). Blocks of 8 rows and a software
   prefetch took it from 20 to 31 GB/s on one core here (fp32, 8192x4096). */
void channel_stats_rows(const void *x, int dtype, int64_t stride, int64_t r0, int64_t r1, int64_t n,
                        const float *thr, int64_t t, uint32_t *colmax, float *colsum, int32_t *counts,
                        uint32_t *rowmax, float *buf) {
    for (int64_t j = 0; j < n; j++) { colmax[j] = 0; colsum[j] = 0.0f; }
    memset(counts, 0, (size_t)(t * n) * sizeof(int32_t));
    const int64_t el = dtype == 0 ? 4 : 2;
    for (int64_t r = r0; r < r1; r += ROWS) {
        const int R = r1 - r < ROWS ? (int)(r1 - r) : ROWS;
        const void *p[ROWS];
        for (int i = 0; i < R; i++) {
            p[i] = (const char *)x + (r + i) * stride * el;
            if (dtype == 2) {  /* float16: convert first, then the float32 path */
                load_row(x, dtype, (r + i) * stride, n, buf + i * n);
                p[i] = buf + i * n;
            }
        }
        const int d = dtype == 1 ? 1 : 0;
        if (R == ROWS && d == 0) stats_block(p, ROWS, 0, n, colmax, colsum, rowmax + r);
        else if (R == ROWS) stats_block(p, ROWS, 1, n, colmax, colsum, rowmax + r);
        else
            for (int i = 0; i < R; i++) {
                if (d == 0) stats_block(p + i, 1, 0, n, colmax, colsum, rowmax + r + i);
                else stats_block(p + i, 1, 1, n, colmax, colsum, rowmax + r + i);
            }
        for (int i = 0; i < R; i++) {
            const float mf = bits_float(rowmax[r + i]);
            const float *a = NULL;
            for (int64_t k = 0; k < t; k++) {
                const float th = thr[k];
                if (mf <= th) continue;  /* nothing above th in this row: the common case */
                if (!a) a = scaled_row(x, dtype, (r + i) * stride, n, NULL, buf + i * n);
                int32_t *c = counts + k * n;
                for (int64_t j = 0; j < n; j++) c[j] += fabsf(a[j]) > th;
            }
        }
    }
}

/* max |x| of a float row, NaN if the row has one (see channel_stats_rows) */
static float row_absmax(const float *a, int64_t n) {
    const uint32_t *u = (const uint32_t *)a;
    uint32_t m = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t v = u[j] & 0x7fffffffu;
        m = v > m ? v : m;
    }
    return bits_float(m);
}

static inline int8_t code(float v) {
    v = rintf(v);
    v = v > 127.0f ? 127.0f : v;
    v = v < -127.0f ? -127.0f : v;
    return (int8_t)(int32_t)(v == v ? v : 0.0f);
}

/* Dynamic per-token int8: scale = absmax / 127, codes = round(x * inv_smooth * ((1 / absmax) * 127)).
   colmax (nullable): this part's per-channel max |x * inv_smooth|. */
void quant_token_rows(const void *x, int dtype, int64_t stride, int64_t r0, int64_t r1, int64_t n,
                      const float *inv_smooth, int8_t *q, float *scales, uint32_t *colmax, float *buf) {
    if (colmax)
        for (int64_t j = 0; j < n; j++) colmax[j] = 0;
    for (int64_t r = r0; r < r1; r++) {
        const float *a = scaled_row(x, dtype, r * stride, n, inv_smooth, buf);
        const float m = row_absmax(a, n);
        if (colmax) {
            const uint32_t *u = (const uint32_t *)a;
            for (int64_t j = 0; j < n; j++) {
                uint32_t v = u[j] & 0x7fffffffu;
                colmax[j] = v > colmax[j] ? v : colmax[j];
            }
        }
        const float amax = m > 1e-12f || m != m ? m : 1e-12f;
        scales[r] = amax / 127.0f;
        const float inv = (1.0f / amax) * 127.0f;
        int8_t *qr = q + r * n;
        for (int64_t j = 0; j < n; j++) qr[j] = code(a[j] * inv);
    }
}

/* Static per-tensor int8: codes = round(x * inv_smooth * inv_scale), in one pass straight from
   the source row (no float buffer: this op is one read and one write). */
#define CODES(LOAD)                                                                          \
    if (inv_smooth) {                                                                       \
        for (int64_t j = 0; j < n; j++) qr[j] = code((LOAD) * inv_smooth[j] * inv_scale);   \
    } else {                                                                                \
        for (int64_t j = 0; j < n; j++) qr[j] = code((LOAD) * inv_scale);                   \
    }

void quant_tensor_rows(const void *x, int dtype, int64_t stride, int64_t r0, int64_t r1, int64_t n,
                       const float *inv_smooth, float inv_scale, int8_t *q, float *buf) {
    (void)buf;
    for (int64_t r = r0; r < r1; r++) {
        int8_t *qr = q + r * n;
        if (dtype == 0) {
            const float *h = (const float *)x + r * stride;
            CODES(h[j])
        } else if (dtype == 1) {
            const uint16_t *h = (const uint16_t *)x + r * stride;
            CODES(bits_float((uint32_t)h[j] << 16))
        } else {
            const _Float16 *h = (const _Float16 *)x + r * stride;
            CODES((float)h[j])
        }
    }
}

/* x (already divided by its scale) to the nearest FP8 E4M3 value, as a float32: saturate to
   +-448, then round half to even to 3 mantissa bits where E4M3 is normal (|x| >= 2^-6) and to
   steps of 2^-9 below (its subnormals) -- what torch's float32 -> float8_e4m3fn conversion gives
   after the twin's clamp, for every float32 (tests/test_ops.py sweeps the bit patterns). NaN
   stays NaN (the comparisons let it through; the bit rounding would carry some payloads into
   infinity or zero, hence the explicit test). Returned as float32 because the fp32 GEMM path
   multiplies these values: no conversion to float8 and back. */
static inline float e4m3(float v) {
    v = v > 448.0f ? 448.0f : v;
    v = v < -448.0f ? -448.0f : v;
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    if ((b & 0x7fffffffu) < 0x3c800000u) return rintf(v * 512.0f) * (1.0f / 512.0f);
    if (v != v) return v;
    return bits_float((b + 0x7ffffu + ((b >> 20) & 1u)) & 0xfff00000u);
}

/* FP8 E4M3 codes (as float32 values) of rows [r0, r1): per token (dynamic), scale =
   max(absmax / 448, 1e-12) and codes = e4m3(x / scale), the twin's operations; static, codes =
   e4m3(x / scale) with the one given scale. */
void fp8_rows(const void *x, int dtype, int64_t stride, int64_t r0, int64_t r1, int64_t n, int dynamic,
              float scale, float *q, float *scales, float *buf) {
    for (int64_t r = r0; r < r1; r++) {
        const float *a = scaled_row(x, dtype, r * stride, n, 0, buf);
        float s = scale;
        if (dynamic) {
            s = row_absmax(a, n) / 448.0f;
            s = s < 1e-12f ? 1e-12f : s;  /* (NaN stays NaN, as torch's clamp_) */
        }
        scales[r] = s;
        float *qr = q + r * n;
        for (int64_t j = 0; j < n; j++) qr[j] = e4m3(a[j] / s);
    }
}
