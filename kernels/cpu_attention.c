/* Paged decode attention for the CPU, float32: each sequence's one query token against its K/V,
 * read in place from the block pool. Shapes as in kernels/reference.py:
 *   q, out        [batch, num_heads, head_dim]
 *   k/v_cache     [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_tables  [batch, max_blocks] int32;  seq_lens [batch] int32, each >= 1
 *
 * The torch path gathers every sequence's blocks into a dense copy and hands it to SDPA: the
 * KV bytes cross memory three times (read, written, read). Here they are read once. One
 * sequence is one task, so a token's K row for all its KV heads (contiguous) serves every query
 * head, and each block is read by one core, front to back (the next block prefetched). Two
 * passes per sequence: scores (query . key, times scale, for every head and position; each dot
 * product's 16 lanes summed as a tree) and a softmax per head (e^x 16 at a time, by vexp);
 * then the probability-weighted sum of V, a KV head's query heads at once with their sums in
 * registers, divided by the softmax's sum at the end. Against one scalar sum and libm's expf per
 * score these took the kernel from 54 to 41 ms a decode step (64 sequences of ~170 tokens, 30
 * layers). head_dim must be a multiple of 16 (the vector width in floats; GCC and Clang lower the
 * 16-float vectors to whatever the CPU has). Sums are plain float32 in a fixed order (no
 * -ffast-math, whose start-up code would also switch the whole process to flush-to-zero):
 * results differ from SDPA's in the last bits only. The common shapes (3 query
 * heads per KV head at head_dim 64, 4 at 128) are compiled for their sizes, others generically.
 *
 * Threads: OpenMP, linked against the libgomp torch has already loaded (same soname), as many as
 * the caller passes (torch.get_num_threads()). Not OpenMP's own default: torch.set_num_threads
 * sets it for the calling thread only, and an engine stepping in another thread (every worker's)
 * got one thread per core, so two one-thread workers on two cores each ran two.
 *
 * Returns 0, or the number of sequences whose score buffer could not be allocated. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vec __attribute__((vector_size(64), aligned(4))); /* 16 floats; unaligned loads */
#define LANES 16
#define MAX_CHUNKS 16 /* head_dim <= 256 */

typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16), aligned(4)));

/* The 16 lanes summed as a tree (halves added, then their halves...): four dependent vector adds
 * instead of sixteen scalar ones. */
static inline float hsum(vec a) {
    vec8 lo8, hi8;
    memcpy(&lo8, &a, sizeof(vec8));
    memcpy(&hi8, (const char *)&a + sizeof(vec8), sizeof(vec8));
    const vec8 s8 = lo8 + hi8;
    vec4 lo4, hi4;
    memcpy(&lo4, &s8, sizeof(vec4));
    memcpy(&hi4, (const char *)&s8 + sizeof(vec4), sizeof(vec4));
    const vec4 s4 = lo4 + hi4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

typedef int32_t ivec __attribute__((vector_size(64), aligned(4)));

/* e^x of 16 floats at once, for the softmax's x <= 0: 2^n e^r with n = floor(x log2(e) + 1/2) and
 * r = x - n ln(2) (ln 2 in two parts), e^r by Cephes' expf polynomial: within 1 ulp of libm's expf
 * on [-87, 0] (every 64th float of it, and every float near 0, checked once).
 * Below -87 (where 2^n leaves float's normal range) it gives 0, as expf nearly does. */
static inline vec vexp(vec x) {
    const ivec tiny = x < -87.0f;
    x = (vec)((ivec)x & ~tiny);
    const vec fx = x * 1.44269504088896341f + 0.5f;
    ivec ni = __builtin_convertvector(fx, ivec); /* truncates: one too many where fx < 0 */
    vec n = __builtin_convertvector(ni, vec);
    const ivec over = n > fx;
    ni += over;
    n += __builtin_convertvector(over, vec);
    const vec r = x - n * 0.693359375f - n * -2.12194440e-4f;
    vec y = 1.9875691500e-4f * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    return (vec)((ivec)(y * (vec)((ni + 127) << 23)) & ~tiny);
}

static inline void prefetch_block(const float *block, int64_t floats) {
    for (int64_t off = 0; off < floats; off += 64 / sizeof(float)) __builtin_prefetch(block + off);
}

/* One sequence. group and chunks (head_dim / LANES) are compile-time constants at the call sites
 * that matter, so the accumulators live in registers. */
static inline __attribute__((always_inline)) int attend(
    const float *qb, float *ob, const float *k_cache, const float *v_cache, const int32_t *table,
    int64_t len, int64_t num_kv_heads, int64_t block_size, float scale, const int64_t group, const int64_t chunks) {
    const int64_t head_dim = chunks * LANES, num_heads = num_kv_heads * group, row = num_kv_heads * head_dim;
    float *scores = malloc(sizeof(float) * num_heads * len); /* [head][position] */
    if (!scores) return 1;
    for (int64_t start = 0; start < len; start += block_size) {
        const float *k = k_cache + (int64_t)table[start / block_size] * block_size * row;
        if (start + block_size < len) prefetch_block(k_cache + (int64_t)table[start / block_size + 1] * block_size * row, block_size * row);
        const int64_t end = len - start < block_size ? len : start + block_size;
        for (int64_t t = start; t < end; t++, k += row)
            for (int64_t h = 0; h < num_kv_heads; h++) {
                vec kv[MAX_CHUNKS];
                for (int64_t c = 0; c < chunks; c++) memcpy(&kv[c], k + h * head_dim + c * LANES, sizeof(vec));
                for (int64_t g = 0; g < group; g++) {
                    const float *qh = qb + (h * group + g) * head_dim;
                    vec acc, qv;
                    memcpy(&qv, qh, sizeof(vec));
                    acc = qv * kv[0];
                    for (int64_t c = 1; c < chunks; c++) {
                        memcpy(&qv, qh + c * LANES, sizeof(vec));
                        acc += qv * kv[c];
                    }
                    scores[(h * group + g) * len + t] = hsum(acc) * scale;
                }
            }
    }
    float inv[num_heads];
    for (int64_t h = 0; h < num_heads; h++) {
        float *p = scores + h * len, max = -INFINITY;
        for (int64_t t = 0; t < len; t++) max = p[t] > max ? p[t] : max;
        vec vsum = {0}, x;
        int64_t t = 0;
        for (; t + LANES <= len; t += LANES) {
            memcpy(&x, p + t, sizeof(vec));
            x = vexp(x - max);
            memcpy(p + t, &x, sizeof(vec));
            vsum += x;
        }
        if (t < len) { /* the last, part-filled vector: its lanes past the end are e^-inf = 0 */
            for (int64_t j = 0; j < LANES; j++) x[j] = t + j < len ? p[t + j] : -INFINITY;
            x = vexp(x - max);
            memcpy(p + t, &x, sizeof(float) * (len - t));
            vsum += x;
        }
        const float sum = hsum(vsum);
        inv[h] = 1.f / sum;
    }
    for (int64_t h = 0; h < num_kv_heads; h++) {
        vec acc[group][chunks];
        memset(acc, 0, sizeof(acc));
        const float *p = scores + h * group * len;
        for (int64_t start = 0; start < len; start += block_size) {
            const float *v = v_cache + (int64_t)table[start / block_size] * block_size * row + h * head_dim;
            const int64_t end = len - start < block_size ? len : start + block_size;
            for (int64_t t = start; t < end; t++, v += row) {
                vec vv[MAX_CHUNKS];
                for (int64_t c = 0; c < chunks; c++) memcpy(&vv[c], v + c * LANES, sizeof(vec));
                for (int64_t g = 0; g < group; g++)
                    for (int64_t c = 0; c < chunks; c++) acc[g][c] += p[g * len + t] * vv[c];
            }
        }
        for (int64_t g = 0; g < group; g++)
            for (int64_t c = 0; c < chunks; c++) acc[g][c] *= inv[h * group + g];
        memcpy(ob + h * group * head_dim, acc, sizeof(acc));
    }
    free(scores);
    return 0;
}

int decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                         const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens,
                         float *out, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t block_size, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads, chunks = head_dim / LANES;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : failed) num_threads(num_threads)
    for (int64_t b = 0; b < batch; b++) {
        const float *qb = q + b * num_heads * head_dim;
        float *ob = out + b * num_heads * head_dim;
        const int32_t *table = block_tables + b * max_blocks;
#define ATTEND(G, C) attend(qb, ob, k_cache, v_cache, table, seq_lens[b], num_kv_heads, block_size, scale, G, C)
        if (group == 3 && chunks == 4) failed += ATTEND(3, 4);
        else if (group == 4 && chunks == 8) failed += ATTEND(4, 8);
        else failed += ATTEND(group, chunks);
    }
    return failed;
}

/* The step's new K and V rows into their slots of the pool: what reference.store_kv's two
 * index_copy_ calls do, in one call (16 against 26 us a layer for 64 decode rows, on pages
 * already touched; a page's first touch, the pool being mapped lazily, costs ~1.7 us either way).
 * key and value are [tokens, num_kv_heads * head_dim] rows `stride` floats apart (views into the
 * step's qkv output); slots[t] is the pool row of token t. Threads only where there is enough
 * to copy. */
void store_kv_f32(const float *key, int64_t key_stride, const float *value, int64_t value_stride,
                  float *k_cache, float *v_cache, const int64_t *slots, int64_t tokens, int64_t row,
                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (tokens * row >= (1 << 16))
    for (int64_t t = 0; t < tokens; t++) {
        memcpy(k_cache + slots[t] * row, key + t * key_stride, sizeof(float) * row);
        memcpy(v_cache + slots[t] * row, value + t * value_stride, sizeof(float) * row);
    }
}

/* Each row's argmax, as torch.argmax: the first index of the largest value, or of the first NaN.
 * torch's CPU argmax compares one element at a time (~3% of a 64-sequence decode step over a
 * 49,152-token vocabulary); here a vector pass finds the row's maximum and a second the first
 * index holding it. A row with a NaN makes the vector maximum unreliable: it is scanned again
 * one element at a time. */
void argmax_f32(const float *x, int64_t rows, int64_t cols, int64_t *out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * cols >= (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * cols;
        int64_t i = 0;
        float max = row[0];
        int nan = 0;
        if (cols >= LANES) {
            vec best, v;
            memcpy(&best, row, sizeof(vec));
            ivec seen_nan = best != best;
            for (i = LANES; i + LANES <= cols; i += LANES) {
                memcpy(&v, row + i, sizeof(vec));
                const ivec greater = v > best;
                best = (vec)(((ivec)v & greater) | ((ivec)best & ~greater));
                seen_nan |= v != v;
            }
            for (int64_t j = 0; j < LANES; j++) {
                max = best[j] > max ? best[j] : max;
                nan |= seen_nan[j] != 0;
            }
        }
        for (; i < cols; i++) {
            max = row[i] > max ? row[i] : max;
            nan |= row[i] != row[i];
        }
        int64_t at = 0;
        if (nan) {
            while (row[at] == row[at]) at++;
        } else {
            while (row[at] != max) at++;
        }
        out[r] = at;
    }
}
