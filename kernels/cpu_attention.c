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
 * passes per sequence: scores (query . key, times scale, for every head and position) and a
 * softmax per head; then the probability-weighted sum of V, a KV head's query heads at once with
 * their sums in registers. head_dim must be a multiple of 16 (the vector width in floats; GCC and
 * Clang lower the 16-float vectors to whatever the CPU has). Sums are plain float32 in a fixed
 * order (no -ffast-math, whose start-up code would also switch the whole process to
 * flush-to-zero): results differ from SDPA's in the last bits only. The common shapes (3 query
 * heads per KV head at head_dim 64, 4 at 128) are compiled for their sizes, others generically.
 *
 * Threads: OpenMP, linked against the libgomp torch has already loaded (same soname), so
 * torch.set_num_threads governs this loop too.
 *
 * Returns 0, or the number of sequences whose score buffer could not be allocated. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vec __attribute__((vector_size(64), aligned(4))); /* 16 floats; unaligned loads */
#define LANES 16
#define MAX_CHUNKS 16 /* head_dim <= 256 */

static inline float hsum(vec a) {
    float s = 0.f;
    for (int j = 0; j < LANES; j++) s += a[j];
    return s;
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
    for (int64_t h = 0; h < num_heads; h++) {
        float *p = scores + h * len, max = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < len; t++) max = p[t] > max ? p[t] : max;
        for (int64_t t = 0; t < len; t++) sum += (p[t] = expf(p[t] - max));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; t++) p[t] *= inv;
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
        memcpy(ob + h * group * head_dim, acc, sizeof(acc));
    }
    free(scores);
    return 0;
}

int decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                         const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens,
                         float *out, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t block_size, float scale) {
    const int64_t group = num_heads / num_kv_heads, chunks = head_dim / LANES;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : failed)
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
