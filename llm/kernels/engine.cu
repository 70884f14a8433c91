// CUDA kernels of the Llama engine, written for clarity first.
//
// Every kernel has a CPU twin with the same semantics in llm/src/kernels.rs (the twin documents the exact
// formula); the host side (launch configurations, shape checks) lives there too, so that the grid each kernel
// expects is computed in one place. The file needs no header (not even cuda_bf16.h): it compiles the same
// with nvcc and with NVRTC, whose include path is empty.
//
// Conventions:
// - Activations (the residual stream, scores, logits) are f32. Weights and the KV cache may be bf16
//   ("storage"); arithmetic is always f32 ("accumulation").
// - bf16 is a 16-bit struct converted by hand: bf16 -> f32 is exact (the top half of an f32), f32 -> bf16
//   rounds to nearest, ties to even, and keeps NaN a (quiet) NaN, exactly as Rust's half::bf16::from_f32.
// - Sizes are 32-bit `int`: the host refuses larger shapes before launching.
// - Every kernel is launched with blockDim.x == ENGINE_BLOCK (256) threads except attention
//   (ATTN_WARPS * 32 threads); __launch_bounds__ states it so that ptxas budgets registers for it.

#define ENGINE_BLOCK 256
#define ATTN_WARPS 4
#define ATTN_THREADS (ATTN_WARPS * 32)
// The largest head_dim attention supports: each lane of a warp holds MAX_HEAD_DIM / 32 elements.
#define MAX_HEAD_DIM 256
#define HEAD_CHUNKS (MAX_HEAD_DIM / 32)

// -inf (math.h's INFINITY is not defined under NVRTC, which has no headers).
__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

struct bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_f32(float v) { return v; }

__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((unsigned int)v.bits) << 16); }

__device__ __forceinline__ unsigned short f32_to_bf16_bits(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u); // NaN stays NaN (quiet)
    }
    unsigned int rounding = 0x7fffu + ((u >> 16) & 1u); // round to nearest, ties to even
    return (unsigned short)((u + rounding) >> 16);
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }

__device__ __forceinline__ void store(bf16* p, float v) { p->bits = f32_to_bf16_bits(v); }

// Sum over a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum over a block of ENGINE_BLOCK threads; every thread gets the total. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    const int warps = blockDim.x / 32;
    float total = lane < warps ? scratch[lane] : 0.0f;
    total = warp_sum(total);
    __syncthreads(); // scratch may be reused by the caller
    return total;
}

// ---------------------------------------------------------------------------------------------------------
// Embedding gather (vocab-parallel): out[t, :] = table[tokens[t] - row_start, :] when this rank holds that
// row, zeros otherwise (the all-reduce over the tensor-parallel group then completes every row).
// Grid: (ceil(hidden / ENGINE_BLOCK), n_tokens).
template <typename T>
__device__ void embed_impl(const T* __restrict__ table, const unsigned int* __restrict__ tokens,
                           float* __restrict__ out, int hidden, int row_start, int rows) {
    const int t = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= hidden) {
        return;
    }
    const long long row = (long long)tokens[t] - row_start;
    float v = 0.0f;
    if (row >= 0 && row < rows) {
        v = to_f32(table[row * hidden + c]);
    }
    out[(long long)t * hidden + c] = v;
}

extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK)
    embed_f32(const float* table, const unsigned int* tokens, float* out, int hidden, int row_start, int rows) {
    embed_impl(table, tokens, out, hidden, row_start, rows);
}

extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK)
    embed_bf16(const bf16* table, const unsigned int* tokens, float* out, int hidden, int row_start, int rows) {
    embed_impl(table, tokens, out, hidden, row_start, rows);
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm of each row: out[r, i] = x[r, i] / sqrt(mean(x[r, :]^2) + eps) * weight[i].
// Grid: (rows); one block per row.
template <typename W, typename O>
__device__ void rms_norm_impl(const float* __restrict__ x, const W* __restrict__ weight, O* __restrict__ out,
                              int dim, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (long long)blockIdx.x * dim;
    O* orow = out + (long long)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        ss += xr[i] * xr[i];
    }
    ss = block_sum(ss, scratch) / (float)dim;
    const float scale = 1.0f / sqrtf(ss + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        store(&orow[i], xr[i] * scale * to_f32(weight[i]));
    }
}

extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK)
    rms_norm_f32(const float* x, const float* weight, float* out, int dim, float eps) {
    rms_norm_impl(x, weight, out, dim, eps);
}

// bf16 weight, bf16 output (the input of a bf16 matrix product).
extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK)
    rms_norm_bf16(const float* x, const bf16* weight, bf16* out, int dim, float eps) {
    rms_norm_impl(x, weight, out, dim, eps);
}

// ---------------------------------------------------------------------------------------------------------
// Rotary embedding, Hugging Face Llama layout ("rotate half": element i of a head pairs with i + half), in
// place on the first `heads` heads of each row of x (the q heads then the k heads of a fused qkv row).
// cos/sin are host-computed tables [max_pos][half] (f64 angles rounded to f32, as the CPU engine's
// Rope::angles, so rope scaling and theta live in one place). Row t is at position positions[t].
//   a = x[i], b = x[i + half];  x[i] = a cos - b sin;  x[i + half] = b cos + a sin.
// Grid: (ceil(heads * half / ENGINE_BLOCK), n_rows).
extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK)
    rope_f32(float* x, const float* cos_table, const float* sin_table, const unsigned int* positions,
             int row_stride, int heads, int half) {
    const int t = blockIdx.y;
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= heads * half) {
        return;
    }
    const int head = k / half;
    const int i = k % half;
    float* h = x + (long long)t * row_stride + (long long)head * 2 * half;
    const long long at = (long long)positions[t] * half + i;
    const float c = cos_table[at];
    const float s = sin_table[at];
    const float a = h[i];
    const float b = h[i + half];
    h[i] = a * c - b * s;
    h[i + half] = b * c + a * s;
}

// ---------------------------------------------------------------------------------------------------------
// KV-cache append: row t of the fused qkv buffer (its keys at column k_offset, values at v_offset, kv_heads
// heads of head_dim each) goes to position positions[t] of the cache of one layer, laid out
// [kv_head][max_seq][head_dim] like the CPU engine's.
// Grid: (ceil(kv_heads * head_dim / ENGINE_BLOCK), n_rows).
template <typename T>
__device__ void kv_append_impl(const float* __restrict__ qkv, T* __restrict__ k_cache, T* __restrict__ v_cache,
                               const unsigned int* __restrict__ positions, int row_stride, int k_offset,
                               int v_offset, int kv_heads, int head_dim, int max_seq) {
    const int t = blockIdx.y;
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= kv_heads * head_dim) {
        return;
    }
    const int j = k / head_dim;
    const int d = k % head_dim;
    const float* row = qkv + (long long)t * row_stride;
    const long long dst = ((long long)j * max_seq + positions[t]) * head_dim + d;
    store(&k_cache[dst], row[k_offset + k]);
    store(&v_cache[dst], row[v_offset + k]);
}

extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK)
    kv_append_f32(const float* qkv, float* k_cache, float* v_cache, const unsigned int* positions, int row_stride,
                  int k_offset, int v_offset, int kv_heads, int head_dim, int max_seq) {
    kv_append_impl(qkv, k_cache, v_cache, positions, row_stride, k_offset, v_offset, kv_heads, head_dim, max_seq);
}

extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK)
    kv_append_bf16(const float* qkv, bf16* k_cache, bf16* v_cache, const unsigned int* positions, int row_stride,
                   int k_offset, int v_offset, int kv_heads, int head_dim, int max_seq) {
    kv_append_impl(qkv, k_cache, v_cache, positions, row_stride, k_offset, v_offset, kv_heads, head_dim, max_seq);
}

// ---------------------------------------------------------------------------------------------------------
// Attention over the KV cache, for decode (one row per sequence) and causal prefill (many rows) alike: row t
// at position p = positions[t] attends to cache positions 0..=p (its own key was appended before).
// Query head i of the rank (global head q_start + i) reads kv head (q_start + i) / group - kv_start (GQA).
//   s[p'] = (q . k[p']) * scale;  w = softmax(s);  out[t, i, :] = sum_p' w[p'] v[p'].
// Grid: (q_heads, n_rows); block: ATTN_WARPS warps. Warp w takes positions w, w + ATTN_WARPS, ... and keeps
// an online softmax (running max m, running sum l, accumulator acc spread over its lanes: lane holds
// elements lane, lane + 32, ...); the warps' partial results are then merged through shared memory.
template <typename T>
__device__ void attention_impl(const float* __restrict__ qkv, const T* __restrict__ k_cache,
                               const T* __restrict__ v_cache, float* __restrict__ out,
                               const unsigned int* __restrict__ positions, int row_stride, int q_heads,
                               int head_dim, int max_seq, int group, int q_start, int kv_start, float scale) {
    __shared__ float part_m[ATTN_WARPS];
    __shared__ float part_l[ATTN_WARPS];
    __shared__ float part_acc[ATTN_WARPS][MAX_HEAD_DIM];

    const int i = blockIdx.x;
    const int t = blockIdx.y;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int j = (q_start + i) / group - kv_start;
    const int ctx = min((int)positions[t] + 1, max_seq);
    const float* q = qkv + (long long)t * row_stride + (long long)i * head_dim;
    const T* keys = k_cache + (long long)j * max_seq * head_dim;
    const T* values = v_cache + (long long)j * max_seq * head_dim;

    float q_reg[HEAD_CHUNKS];
    float acc[HEAD_CHUNKS];
#pragma unroll
    for (int c = 0; c < HEAD_CHUNKS; c++) {
        const int d = lane + 32 * c;
        q_reg[c] = d < head_dim ? q[d] : 0.0f;
        acc[c] = 0.0f;
    }
    float m = neg_inf();
    float l = 0.0f;
    for (int p = warp; p < ctx; p += ATTN_WARPS) {
        const T* kp = keys + (long long)p * head_dim;
        const T* vp = values + (long long)p * head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < HEAD_CHUNKS; c++) {
            const int d = lane + 32 * c;
            if (d < head_dim) {
                dot += q_reg[c] * to_f32(kp[d]);
            }
        }
        const float s = warp_sum(dot) * scale;
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new); // 0 on the first position (m = -inf)
        const float w = expf(s - m_new);
        l = l * correction + w;
#pragma unroll
        for (int c = 0; c < HEAD_CHUNKS; c++) {
            const int d = lane + 32 * c;
            if (d < head_dim) {
                acc[c] = acc[c] * correction + w * to_f32(vp[d]);
            }
        }
        m = m_new;
    }

    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < HEAD_CHUNKS; c++) {
        const int d = lane + 32 * c;
        if (d < head_dim) {
            part_acc[warp][d] = acc[c];
        }
    }
    __syncthreads();

    // Merge the warps' partial results. A warp that saw no position (ctx < ATTN_WARPS) has m = -inf and
    // l = 0, so its weight below is 0; warp 0 always sees position 0, so m_all is finite.
    float m_all = neg_inf();
    for (int w = 0; w < ATTN_WARPS; w++) {
        m_all = fmaxf(m_all, part_m[w]);
    }
    float l_all = 0.0f;
    for (int w = 0; w < ATTN_WARPS; w++) {
        l_all += part_l[w] * expf(part_m[w] - m_all);
    }
    float* o = out + ((long long)t * q_heads + i) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) {
            v += part_acc[w][d] * expf(part_m[w] - m_all);
        }
        o[d] = v / l_all;
    }
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_f32(const float* qkv, const float* k_cache, const float* v_cache, float* out,
                  const unsigned int* positions, int row_stride, int q_heads, int head_dim, int max_seq, int group,
                  int q_start, int kv_start, float scale) {
    attention_impl(qkv, k_cache, v_cache, out, positions, row_stride, q_heads, head_dim, max_seq, group, q_start,
                   kv_start, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_bf16(const float* qkv, const bf16* k_cache, const bf16* v_cache, float* out,
                   const unsigned int* positions, int row_stride, int q_heads, int head_dim, int max_seq, int group,
                   int q_start, int kv_start, float scale) {
    attention_impl(qkv, k_cache, v_cache, out, positions, row_stride, q_heads, head_dim, max_seq, group, q_start,
                   kv_start, scale);
}

// ---------------------------------------------------------------------------------------------------------
// SiLU-mul on fused gate/up rows: row t of gate_up is [gate (ffn values), up (ffn values)];
//   out[t, f] = silu(gate[f]) * up[f],  silu(g) = g / (1 + exp(-g)).
// Grid: (ceil(ffn / ENGINE_BLOCK), n_rows).
template <typename O>
__device__ void silu_mul_impl(const float* __restrict__ gate_up, O* __restrict__ out, int ffn) {
    const int t = blockIdx.y;
    const int f = blockIdx.x * blockDim.x + threadIdx.x;
    if (f >= ffn) {
        return;
    }
    const float* row = gate_up + (long long)t * 2 * ffn;
    const float g = row[f];
    const float u = row[ffn + f];
    store(&out[(long long)t * ffn + f], g / (1.0f + expf(-g)) * u);
}

extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK) silu_mul_f32(const float* gate_up, float* out, int ffn) {
    silu_mul_impl(gate_up, out, ffn);
}

// bf16 output (the input of a bf16 down projection).
extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK) silu_mul_bf16(const float* gate_up, bf16* out, int ffn) {
    silu_mul_impl(gate_up, out, ffn);
}

// ---------------------------------------------------------------------------------------------------------
// Residual add: x[i] += delta[i]. Grid: (ceil(n / ENGINE_BLOCK)).
template <typename T>
__device__ void residual_add_impl(float* __restrict__ x, const T* __restrict__ delta, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        x[i] += to_f32(delta[i]);
    }
}

extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK) residual_add_f32(float* x, const float* delta, int n) {
    residual_add_impl(x, delta, n);
}

extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK) residual_add_bf16(float* x, const bf16* delta, int n) {
    residual_add_impl(x, delta, n);
}

// ---------------------------------------------------------------------------------------------------------
// f32 -> bf16 (round to nearest, ties to even). Grid: (ceil(n / ENGINE_BLOCK)).
extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK) cast_f32_bf16(const float* x, bf16* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        store(&out[i], x[i]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Greedy argmax of each row of logits: the first index of the largest value; NaN never wins; a row of
// nothing but -inf or NaN gives 0 (as the CPU sampler's argmax).
// Grid: (rows); one block per row.
struct ArgMax {
    float v;
    unsigned int i;
};

// The better of two candidates: the larger value, the smaller index on a tie.
__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
    if (b.v > a.v || (b.v == a.v && b.i < a.i)) {
        return b;
    }
    return a;
}

extern "C" __global__ void __launch_bounds__(ENGINE_BLOCK)
    argmax_f32(const float* logits, unsigned int* out, int vocab) {
    __shared__ float best_v[32];
    __shared__ unsigned int best_i[32];
    const float* row = logits + (long long)blockIdx.x * vocab;
    ArgMax best = {neg_inf(), 0u};
    for (int k = threadIdx.x; k < vocab; k += blockDim.x) {
        const float v = row[k];
        if (v > best.v) { // strict, in increasing k: the first maximum of this thread's elements; skips NaN
            best.v = v;
            best.i = (unsigned int)k;
        }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        ArgMax other;
        other.v = __shfl_xor_sync(0xffffffffu, best.v, offset);
        other.i = __shfl_xor_sync(0xffffffffu, best.i, offset);
        best = better(best, other);
    }
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    if (lane == 0) {
        best_v[warp] = best.v;
        best_i[warp] = best.i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        ArgMax total = {best_v[0], best_i[0]};
        for (int w = 1; w < (int)(blockDim.x / 32); w++) {
            ArgMax other = {best_v[w], best_i[w]};
            total = better(total, other);
        }
        out[blockIdx.x] = total.i;
    }
}
