// A decode step's run of sliding-window layers in one persistent launch (Hymba-1.5B's shapes, H100, bf16 weights).
// kernels/persistent_decode.py compiles it (NVRTC), lays out what it reads and launches it; PERFORMANCE.md
// versions 13-19 measured how it came to be this way. One block a multiprocessor, in clusters of CLN blocks.
//
// Every block streams its share of the four products of every layer (in_proj, out_proj, gate/up, down) through a
// ring of bulk copies in shared memory: one producer thread issues them ahead, NWC consumer warps sum whole stages.
// A product's outputs are tagged words in global memory (value | step and layer tag), polled in place by the blocks
// that need them, so no grid barrier ever runs. Between in_proj and out_proj each block has one role:
//   attention (the first NKV clusters): kv head b / CLN, its keys split over the cluster's ranks: RoPE, scores,
//     a partial softmax and o = p v over the split, then the partials merged inside the cluster (st.async onto
//     mbarriers), each rank merging its slice of the head's outputs. A global layer's keys come in tiles of KTOT,
//     each rank's share of a tile one ring stage, with a running softmax across the tiles;
//   SSM (the next NSSM blocks, CPB channels each): conv update, x_proj's partial sums reduce-scattered inside the
//     cluster, then crossing the SSM clusters once as tagged words; dt/B/C norms, dt_proj, the state update, the
//     gate;
//   the rest: products only.
// Each block keeps its rows of the fp32 residual stream in shared memory across layers.
#define H 1600
#define D 3200
#define I 5504
#define NKV 5
#define DQ 64
#define DV 128
#define GQ 5
#define RDT 100
#define NS 16
#define XW 132
#define KTOT 1152                      // a sliding layer's buffer: 128 meta tokens + a 1024-slot ring
#define CLN 8                          // blocks a cluster
#define NSSM 64                        // SSM blocks
#define NWC 11                         // consumer warps (the products need 96-121 registers: room for the chains)
#define NCONS (NWC * 32)
#define NDESC 14                       // ring stages in flight at most
#define INFLIGHT_BYTES 65536           // bytes asked for and not landed at most
#define RG0 8                          // rows a stage: in_proj, out_proj, gate/up (pairs), down
#define RG1 4
#define RG2 4
#define RG3 2
#define PST 16
#define SPL CLN                        // a kv head's key splits: the ranks of one cluster
#define KMAX (KTOT / SPL)              // keys a rank
#define CPB (D / NSSM)                 // SSM channels an SSM block
#define ATTB (NKV * CLN)               // the first SSM block
#define NM (GQ * DV / CLN)             // attention outputs a rank merges
#define XREC (12 + NM)                 // floats a rank receives from each sender: m[5] l[5] 0 0 | o slice
#define XO ((XW + CLN - 1) / CLN)      // x_proj outputs a rank owns
#define SSMC (NSSM / CLN)              // SSM clusters
#define SSMT 2                         // threads a channel in the state update
#define XWP 136                        // x_proj row (a channel's 132 weights), padded to 16 bytes
#define RDTP 104                       // dt_proj row, padded
#define MAXL 32                        // layers a launch at most
#define TIMEOUT_NS 200000000ull        // a wait this long sets *err and gives up (never a hang)

typedef unsigned short bf16_t;

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned long long a; asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p)); return (unsigned)a;
}
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n .reg .pred p;\n LAB_WAIT:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        " @!p bra LAB_WAIT;\n}" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ unsigned mapa(unsigned a, unsigned rank) {
    unsigned r; asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank)); return r;
}
__device__ __forceinline__ void st_async(unsigned a, unsigned v, unsigned remote_bar) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.u32 [%0], %1, [%2];"
                 :: "r"(a), "r"(v), "r"(remote_bar) : "memory");
}
__device__ __forceinline__ bool mbar_test_cluster(unsigned bar, unsigned parity) {
    unsigned ok;
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}" : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
    return ok;
}
__device__ __forceinline__ void st_async_v4(unsigned a, float4 v, unsigned remote_bar) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
                 :: "r"(a), "r"(__float_as_uint(v.x)), "r"(__float_as_uint(v.y)), "r"(__float_as_uint(v.z)),
                    "r"(__float_as_uint(v.w)), "r"(remote_bar) : "memory");
}
__device__ __forceinline__ unsigned long long gtimer() {
    unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t;
}
// polled words: relaxed at GPU scope, so every poll goes to L2 and sees other multiprocessors' stores
__device__ __forceinline__ unsigned ld_poll(const unsigned* p) {
    unsigned v; asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ uint4 ld_poll4(const unsigned* p) {
    uint4 v;
    asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ unsigned long long ld_poll64(const unsigned long long* p) {
    unsigned long long v; asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ ulonglong2 ld_poll2x64(const unsigned long long* p) {
    ulonglong2 v;
    asm volatile("ld.relaxed.gpu.global.v2.u64 {%0, %1}, [%2];" : "=l"(v.x), "=l"(v.y) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_relaxed32(unsigned* p, unsigned v) {
    asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed64(unsigned long long* p, unsigned long long v) {
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void cons_sync() { asm volatile("bar.sync 1, %0;" :: "n"(NCONS) : "memory"); }
__device__ __forceinline__ float warp_sum(float a) {
    for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
    return a;
}
__device__ __forceinline__ unsigned bf16_bits(float f) {  // round to nearest even
    unsigned u = __float_as_uint(f); u += 0x7fffu + ((u >> 16) & 1u); return u >> 16;
}
__device__ __forceinline__ float bfr(float f) { return __uint_as_float(bf16_bits(f) << 16); }  // rounded to bf16
__device__ __forceinline__ float bf2f(bf16_t v) { return __uint_as_float((unsigned)v << 16); }
__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }


// One warp sums R weight rows (a stage) against the operand (PERFORMANCE.md version 13's unit): lane-strided 16-byte
// chunks, fp32 accumulation; the slot is released once every lane has read it, then the sums meet across lanes.
template <int R, int c4>
__device__ __forceinline__ void unit_dot(const uint4* W, const uint4* X, int lane, unsigned ebar, float* out) {
    constexpr bool POW2 = R == 1 || R == 2 || R == 4 || R == 8;
    float a[R > 8 ? R : 8];
    #pragma unroll
    for (int r = 0; r < (R > 8 ? R : 8); ++r) a[r] = 0.f;
    for (int c = lane; c < c4; c += 32) {
        const uint4 x = X[c];
        const float x0 = __uint_as_float(x.x << 16), x1 = __uint_as_float(x.x & 0xffff0000u);
        const float x2 = __uint_as_float(x.y << 16), x3 = __uint_as_float(x.y & 0xffff0000u);
        const float x4 = __uint_as_float(x.z << 16), x5 = __uint_as_float(x.z & 0xffff0000u);
        const float x6 = __uint_as_float(x.w << 16), x7 = __uint_as_float(x.w & 0xffff0000u);
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            const uint4 w = W[r * c4 + c];
            float t = a[r];
            t = fmaf(__uint_as_float(w.x << 16), x0, t); t = fmaf(__uint_as_float(w.x & 0xffff0000u), x1, t);
            t = fmaf(__uint_as_float(w.y << 16), x2, t); t = fmaf(__uint_as_float(w.y & 0xffff0000u), x3, t);
            t = fmaf(__uint_as_float(w.z << 16), x4, t); t = fmaf(__uint_as_float(w.z & 0xffff0000u), x5, t);
            t = fmaf(__uint_as_float(w.w << 16), x6, t); t = fmaf(__uint_as_float(w.w & 0xffff0000u), x7, t);
            a[r] = t;
        }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(ebar);
    if constexpr (!POW2) {
        #pragma unroll
        for (int r = 0; r < R; ++r) { const float v = warp_sum(a[r]); if (lane == 0) out[r] = v; }
        return;
    }
    int n = R, row = 0;
    #pragma unroll
    for (int off = 16; off >= 1; off >>= 1) {
        if (n > 1) {
            const bool hi = lane & off;
            #pragma unroll
            for (int j = 0; j < 4; ++j)
                if (j < n / 2) a[j] = (hi ? a[j + n / 2] : a[j]) + __shfl_xor_sync(0xffffffffu, hi ? a[j] : a[j + n / 2], off);
            row = 2 * row + hi;
            n /= 2;
        } else a[0] += __shfl_xor_sync(0xffffffffu, a[0], off);
    }
    if constexpr (POW2) if ((lane & (32 / (POW2 ? R : 1) - 1)) == 0) out[row] = a[0];
}

// What a launch reads of one layer (kernels/persistent_decode.py fills it). Rows are padded to 16 bytes so that a
// block's slice of each chain input is one bulk copy.
struct Layer {
    const bf16_t* w_in;    // [n_in][H] in_proj: q (1600) | k (320) v (640) if kv | x (3200) | z (3200)
    const bf16_t* w_out;   // [H][D]
    const bf16_t* w_gate;  // [I][H]
    const bf16_t* w_up;    // [I][H]
    const bf16_t* w_down;  // [H][I]
    const float* nw;       // [2][H] input_layernorm, pre_moe_layernorm
    const bf16_t* nav;     // [2][D] pre_avg_layernorm1, 2
    const bf16_t* wxT;     // [D][XWP] x_proj, transposed
    const bf16_t* dtp;     // [D][RDTP] dt_proj
    const float* aneg;     // [D][NS] A = -exp(A_log)
    const float* cpar;     // [D][4] conv bias, dt bias, D, 0
    const float* cw;       // [D][4] conv weights (tap 3 multiplies this token's x)
    const float* nx;       // [XW] dt (100), B (16), C (16) norm weights
    float* cst;            // [D][4] conv state: the last three x, then padding
    float* sst;            // [D][NS] SSM state
    bf16_t* kc;            // [NKV][KTOT][DQ] keys (post-RoPE) of this layer's KV producer
    bf16_t* vc;            // [NKV][KTOT][DV] values
    int n_in;              // in_proj rows: 8960 with k v, 8000 without
    int kv;                // 1: this layer computes and writes K/V; 0: it reads its producer's, this step's row included
    int kv_rows;           // the K/V buffer's rows: KTOT for a sliding layer, meta + max_model_len for a global one
    int glob;              // 1: global attention (keys in tiles of KTOT, idx_g's slot and count), 0: sliding (idx_s's)
};
#define LAYB (MAXL * (int)sizeof(Layer))
#define KEEPB ((DQ + DV) * 2)

// product p: K, and outputs a stage
__device__ __forceinline__ int p_k(int p) { return p == 0 ? H : (p == 1 ? D : (p == 2 ? H : I)); }
__device__ __forceinline__ int p_rg(int p) { return p == 0 ? RG0 : (p == 1 ? RG1 : (p == 2 ? RG2 : RG3)); }
// a block's output rows of product p (n rows in all)
__device__ __forceinline__ void row_range(int n, int b, int G, int& rb, int& re) {
    rb = (int)((long long)n * b / G); re = (int)((long long)n * (b + 1) / G);
}
// a word's tag: the step (gv) and the product (layer l, product p); the low 16 bits go into bf16 words
__device__ __forceinline__ unsigned tag32(unsigned gv, int l, int p) { return gv * 256u + (unsigned)(l * 4 + p) + 1u; }

// the chain stage of an SSM or products-only block: out_proj's norm weights, then the SSM block's data (each piece
// 16-byte aligned); an attention block's norm weights come as a stage of their own, after its key tiles
#define CS_NAV 0
#define CS_WX (2 * D * 2)
#define WXB (CPB * XWP * 2)
#define DTB (CPB * RDTP * 2)
#define CS_DT (CS_WX + WXB)
#define CS_A (CS_DT + DTB)
#define CS_S (CS_A + CPB * NS * 4)
#define CS_CS (CS_S + CPB * NS * 4)
#define CS_CW (CS_CS + CPB * 16)
#define CS_CP (CS_CW + CPB * 16)
#define CS_NX (CS_CP + CPB * 16)
#define CS_TK 0                        // an attention block's key tile stage: its rank's keys, then values
#define CS_TV (KMAX * DQ * 2)
#define CS_TILE_BYTES ((CS_TV + KMAX * DV * 2 + 127) / 128 * 128)
#define CS_SSM_BYTES ((CS_NX + XW * 4 + 127) / 128 * 128)
#define CS_NONE_BYTES ((2 * D * 2 + 127) / 128 * 128)

// Runs layers [l0, l1) of one decode step. h_in: the residual stream before layer l0 (fp32); h_out: after l1 - 1.
// Scratch (zeroed once; tags keep every word's step and layer): hw [H] residual words, buf0 [8960] in_proj's,
// buf2 [I] the gated MLP activations, bufm [2 D] attention | SSM outputs, xg [2][SSMC][XW] x_proj's cluster sums.
// gen: this step's number (a CUDA graph replays the step; engine adds one before each); pos: the position;
// idx_s, idx_g: (slot, filled slots) of the sliding and of the global layers' buffers; cos_t, sin_t: [positions][DQ]
// RoPE tables. G: the blocks that share the products, the launch's own (a test names more, as blocks that never run).
extern "C" __global__ void __cluster_dims__(CLN, 1, 1) __launch_bounds__(NCONS + 32, 1) persistent_decode(
    const Layer* __restrict__ layers, int l0, int l1, const float* __restrict__ h_in, float* __restrict__ h_out,
    unsigned long long* hw, unsigned* buf0, unsigned* buf2, unsigned* bufm, unsigned long long* xg,
    const unsigned* gen, const long long* pos, const long long* idx_s, const long long* idx_g, const float* cos_t,
    const float* sin_t,
    unsigned* err, int G)
{
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned long long* full = (unsigned long long*)smem;          // [NDESC] a stage landed
    unsigned long long* empty = full + NDESC;                      // [NDESC] a stage read
    unsigned long long* cbar = (unsigned long long*)(smem + 256);  // [2] the cluster's exchange into this block, by layer parity
    unsigned* doff = (unsigned*)(smem + 512);                      // [NDESC] a stage's offset in the ring
    unsigned* dsz = (unsigned*)(smem + 640);                       // [NDESC] its bytes (the producer's)
    float* red = (float*)(smem + 768);                             // two floats a consumer warp
    float* hloc = (float*)(smem + 896);                            // this block's rows of h (14 at most)
    unsigned* failed = (unsigned*)(smem + 1008);                   // set by a wait that gave up (see h_out)
    float* part = (float*)(smem + 1024);                           // [64][PST] a stage's row sums
    uint4* xs = (uint4*)(smem + 1024 + PARTB);                     // the operand, bf16, up to I values
    float* xch = (float*)(smem + 1024 + PARTB + 2 * I);            // XCHB: the receive areas, by layer parity
    Layer* lay = (Layer*)(smem + 1024 + PARTB + 2 * I + XCHB);     // layers [l0, l1)
    bf16_t* keep = (bf16_t*)((unsigned char*)lay + LAYB);          // the slot owner's last K | V row, for consumers
    unsigned char* ring = (unsigned char*)keep + KEEPB;            // RING_BYTES, stages packed by bytes
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int b = blockIdx.x;
    const unsigned gv = *gen;
    const int hb = (int)((long long)H * b / G), he = (int)((long long)H * (b + 1) / G);
    for (int i = tid; i < he - hb; i += blockDim.x) hloc[i] = h_in[hb + i];
    if (tid == 0) *failed = ld_poll(err) ? 1u : 0u;  // an earlier step's wait that gave up: every step is poisoned
#define GIVE_UP(bit) do { atomicOr(err, bit); *failed = 1u; } while (0)
// once a wait of this block has given up (or the step started poisoned), its other waits give up at once: the step's
// result is lost already, and the launch then ends after one timeout, not one for every wait that follows
#define GAVE_UP (*(volatile unsigned*)failed != 0u)
// when a wait that started at t0 gives up
#define WAIT_OVER(t0) (GAVE_UP || gtimer() - (t0) > TIMEOUT_NS)
    for (int i = tid; i < (l1 - l0) * (int)sizeof(Layer) / 4; i += blockDim.x)
        ((unsigned*)lay)[i] = ((const unsigned*)(layers + l0))[i];
    const bool r_att = b < ATTB, r_ssm = !r_att && b < ATTB + NSSM;
    const unsigned rank = (unsigned)(b % CLN);  // == %cluster_ctarank: a cluster is CLN consecutive blocks
    const unsigned xbytes = r_att ? CLN * XREC * 4 : CLN * XO * 4;  // what the exchange brings a layer
    if (tid == 0) {
        for (int s = 0; s < NDESC; ++s) { mbar_init(smem_u32(full + s), 1); mbar_init(smem_u32(empty + s), 1); }
        if (r_att || r_ssm)
            for (int s = 0; s < 2; ++s) { mbar_init(smem_u32(cbar + s), 1); mbar_expect_tx(smem_u32(cbar + s), xbytes); }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    // every peer's mbarriers initialised before anyone stores into them
    asm volatile("barrier.cluster.arrive.release;\n barrier.cluster.wait.acquire;" ::: "memory");
    const int ag = b / CLN, k0 = (int)rank * KMAX, c0 = (b - ATTB) * CPB;
    // this step's slot and filled-slot count, in the sliding layers' buffers and in the global layers'
    const int slot_s = (int)idx_s[0], nv_s = (int)idx_s[1], slot_g = (int)idx_g[0], nv_g = (int)idx_g[1];
    if (warp == NWC) {  // the producer: one thread streams every stage of every product, in the consumers' order
        if (lane != 0) return;
        unsigned gu = 0, tailu = 0, flu = 0, head = 0, inflight = 0;
        // the next stage's place: sz bytes of ring (after head, or from 0), a free descriptor, and at most
        // INFLIGHT_BYTES asked for and not landed; returns the ring offset, the stage's barrier armed for tx bytes
        auto reserve = [&](unsigned sz, unsigned tx, unsigned& bar) -> unsigned {
            unsigned at;
            for (;;) {
                at = head + sz <= RING_BYTES ? head : 0;
                bool ok = true;
                if (tailu != gu) {
                    const unsigned tail = doff[tailu % NDESC];
                    if (gu - tailu >= NDESC) ok = false;
                    else if (tail < head) ok = at == head || sz <= tail;
                    else ok = at == head && head + sz <= tail;
                }
                if (ok) break;
                mbar_wait(smem_u32(empty + tailu % NDESC), (tailu / NDESC) & 1);
                ++tailu;
                for (; flu < tailu; ++flu) inflight -= dsz[flu % NDESC];
            }
            for (; flu < gu && inflight + tx > INFLIGHT_BYTES; ++flu) {
                mbar_wait(smem_u32(full + flu % NDESC), (flu / NDESC) & 1);
                inflight -= dsz[flu % NDESC];
            }
            const unsigned d = gu % NDESC;
            bar = smem_u32(full + d);
            doff[d] = at; dsz[d] = tx;
            head = at + sz; inflight += tx;
            mbar_expect_tx(bar, tx);
            return at;
        };
        for (int l = l0; l < l1; ++l) {
            const Layer& ly = lay[l - l0];
            for (int p = 0; p < 4; ++p) {
                if (p == 1 && r_att) {  // the key tiles: this rank's filled rows of each; then out_proj's norm weights
                    const int nv = ly.glob ? nv_g : nv_s, ntile = (nv + KTOT - 1) / KTOT;
                    for (int t = 0; t < ntile; ++t, ++gu) {
                        const int base = t * KTOT + k0, jv = max(0, min(KMAX, nv - base));
                        unsigned bar;
                        const unsigned dst = smem_u32(ring + reserve(CS_TILE_BYTES, jv * (DQ + DV) * 2, bar));
                        if (jv > 0) {
                            const unsigned long long row = (unsigned long long)ag * ly.kv_rows + base;
                            bulk_copy(dst + CS_TK, ly.kc + row * DQ, jv * DQ * 2, bar);
                            bulk_copy(dst + CS_TV, ly.vc + row * DV, jv * DV * 2, bar);
                        }
                    }
                    unsigned bar;
                    bulk_copy(smem_u32(ring + reserve(CS_NONE_BYTES, 2 * D * 2, bar)) + CS_NAV, ly.nav, 2 * D * 2, bar);
                    ++gu;
                } else if (p == 1) {  // the chain stage: out_proj's norm weights, and the role's data
                    const unsigned sz = r_ssm ? CS_SSM_BYTES : CS_NONE_BYTES;
                    const unsigned tx = 2 * D * 2 + (r_ssm ? CPB * (NS * 8 + 48) + XW * 4 + WXB + DTB : 0);
                    unsigned bar;
                    const unsigned dst = smem_u32(ring + reserve(sz, tx, bar));
                    bulk_copy(dst + CS_NAV, ly.nav, 2 * D * 2, bar);
                    if (r_ssm) {
                        bulk_copy(dst + CS_WX, ly.wxT + (unsigned long long)c0 * XWP, CPB * XWP * 2, bar);
                        bulk_copy(dst + CS_DT, ly.dtp + (unsigned long long)c0 * RDTP, CPB * RDTP * 2, bar);
                        bulk_copy(dst + CS_A, ly.aneg + c0 * NS, CPB * NS * 4, bar);
                        bulk_copy(dst + CS_S, ly.sst + c0 * NS, CPB * NS * 4, bar);
                        bulk_copy(dst + CS_CS, ly.cst + c0 * 4, CPB * 16, bar);
                        bulk_copy(dst + CS_CW, ly.cw + c0 * 4, CPB * 16, bar);
                        bulk_copy(dst + CS_CP, ly.cpar + c0 * 4, CPB * 16, bar);
                        bulk_copy(dst + CS_NX, ly.nx, XW * 4, bar);
                    }
                    ++gu;
                }
                int rb, re;
                row_range(p == 0 ? ly.n_in : (p == 2 ? I : H), b, G, rb, re);
                const int rg = p_rg(p), ng = (re - rb + rg - 1) / rg;
                const bf16_t* w = p == 0 ? ly.w_in : (p == 1 ? ly.w_out : (p == 2 ? ly.w_gate : ly.w_down));
                for (int g = 0; g < ng; ++g, ++gu) {
                    const int cnt = min(rg, re - rb - g * rg);
                    const unsigned rbytes = 2 * p_k(p), sz = (p == 2 ? 2 : 1) * rg * rbytes, tx = (p == 2 ? 2 : 1) * cnt * rbytes;
                    unsigned bar;
                    const unsigned dst = smem_u32(ring + reserve(sz, tx, bar));
                    for (int i = 0; i < cnt; ++i) {
                        const unsigned long long row = rb + g * rg + i;
                        bulk_copy(dst + i * rbytes, w + row * (rbytes / 2), rbytes, bar);
                        if (p == 2) bulk_copy(dst + (rg + i) * rbytes, ly.w_up + row * H, rbytes, bar);
                    }
                }
            }
        }
        return;
    }
    unsigned gu = 0;
    const long long ps = *pos;
    const float rcos = cos_t[ps * DQ + lane], rsin = sin_t[ps * DQ + lane];  // this position's tables, a pair a lane
    unsigned chd = 0;  // the chain stage's descriptor, released after out_proj's staging
    for (int l = l0; l < l1; ++l) {
        const Layer& ly = lay[l - l0];
        const int li = l - l0;  // the launch's own layer count: the mbarriers' phases
        const int off_x = ly.kv ? H + NKV * (DQ + DV) : H, off_z = off_x + D;
        for (int p = 0; p < 4; ++p) {
            const unsigned long long tp0 = gtimer();
            if (p == 1) {
                cons_sync();  // part and xs are free: in_proj's epilogue is done with them
                const unsigned want = tag32(gv, l, 0) & 0xffffu;
                const unsigned pb = (unsigned)li & 1u, cbr = smem_u32(cbar + pb);
                float* xr = xch + pb * (CLN * XREC);  // this layer's receive area
                // attention role's scratch (in xs)
                float* qs = (float*)xs;            // [GQ][DQ] q, rotated
                float* kn = qs + GQ * DQ;          // [DQ] this step's key, rotated
                float* vn = kn + DQ;               // [DV] its value
                float* sc = vn + DV;               // [KMAX][8] scores (5 heads, 3 unused), then p
                float* ob = sc + 8 * KMAX;         // [GQ][DV] this split's unnormalised outputs
                float* ml = ob + GQ * DV;          // m[GQ], l[GQ], 0, 0
                // SSM role's scratch (in xs)
                float* us = (float*)xs;            // [CPB] x, then u = silu(conv), bf16-rounded
                float* zs = us + 256;              // [CPB] z
                float* sv = zs + 256;              // [XW] x_proj's outputs, then normalized dt_in | B | C
                float* r7 = sv + 144;              // [NWC][136] each warp's x_proj partial sums
                // poll the in_proj words this block needs (attention: 5 q heads, with kv also k and v; SSM: x, z)
                if (r_att || r_ssm) {
                    constexpr int Q = ((GQ * DQ + DQ + DV > 2 * CPB ? GQ * DQ + DQ + DV : 2 * CPB) + NCONS - 1) / NCONS;
                    const int nw2 = r_att ? (ly.kv ? GQ * DQ + DQ + DV : GQ * DQ) : 2 * CPB;
                    int src[Q]; float* dst[Q]; bool good[Q]; unsigned v[Q];
                    #pragma unroll
                    for (int q = 0; q < Q; ++q) {
                        const int i = tid + q * NCONS;
                        good[q] = i >= nw2; src[q] = 0; dst[q] = sv;
                        if (good[q]) continue;
                        if (r_att) {
                            if (i < GQ * DQ) { src[q] = ag * GQ * DQ + i; dst[q] = qs + i; }
                            else if (i < GQ * DQ + DQ) { src[q] = H + ag * DQ + i - GQ * DQ; dst[q] = kn + i - GQ * DQ; }
                            else { src[q] = H + NKV * DQ + ag * DV + i - GQ * DQ - DQ; dst[q] = vn + i - GQ * DQ - DQ; }
                        } else if (i < CPB) { src[q] = off_x + c0 + i; dst[q] = us + i; }
                        else { src[q] = off_z + c0 + i - CPB; dst[q] = zs + i - CPB; }
                    }
                    for (;;) {
                        bool ok = true;
                        #pragma unroll
                        for (int q = 0; q < Q; ++q)
                            if (!good[q]) { v[q] = ld_poll(buf0 + src[q]); good[q] = (v[q] & 0xffffu) == want; ok = ok && good[q]; }
                        if (ok) break;
                        if (WAIT_OVER(tp0)) { GIVE_UP(1u); break; }
                    }
                    #pragma unroll
                    for (int q = 0; q < Q; ++q) if (tid + q * NCONS < nw2) *dst[q] = __uint_as_float(v[q] & 0xffff0000u);
                }
                const unsigned char* cs = ring;  // the chain stage (attention blocks wait for their tiles below)
                if (!r_att) {
                    chd = gu % NDESC;
                    mbar_wait(smem_u32(full + chd), (gu / NDESC) & 1);
                    cs = ring + doff[chd];
                    ++gu;
                }
                cons_sync();
                // waits for this layer's exchange on cbar, then arms it for the launch's layer li + 2 (the peers
                // cannot be two layers ahead: every layer's products need this block). Once a wait of this block has
                // given up, the peers can be: cbar's phases no longer tell the layers apart (a later test could pass
                // on a phase already armed, and a second arrival on it traps), so it is not touched again.
                auto cluster_wait = [&]() {
                    if (tid == 0 && !GAVE_UP) {
                        const unsigned long long t0 = gtimer();
                        bool done = true;
                        while (!mbar_test_cluster(cbr, ((unsigned)li >> 1) & 1u))
                            if (WAIT_OVER(t0)) { GIVE_UP(2u); done = false; break; }
                        if (done) mbar_expect_tx(cbr, xbytes);
                    }
                    cons_sync();
                };
                if (r_att) {
                    // RoPE on the 5 q heads and (a KV-producing layer) the step's key. Then the key tiles, each with
                    // a running softmax: scores over the tile's filled rows (the rest -inf), the running max and sum
                    // rescaled, o += p v (registers of warps 0-3, a quarter of the rows each). The slot's owner puts
                    // this step's key and value (rounded as the cache keeps them) into its staged rows of the tile
                    // that holds the slot: a KV-producing layer computes them and writes them to the cache (and, if
                    // sliding, to keep); a consumer takes them from keep.
                    const int slot = ly.glob ? slot_g : slot_s, nv = ly.glob ? nv_g : nv_s;
                    const int ntile = (nv + KTOT - 1) / KTOT;
                    float* scT = sc;
                    float* red8 = ml + 16;             // [2][NWC][8] the softmax's partial maxima and sums
                    float* mr = red8 + 2 * NWC * 8;    // [GQ] the running max, [GQ] sum, [GQ] this tile's rescale
                    float* lr = mr + 8;
                    float* scl = lr + 8;
                    if (tid < GQ * 32 + 32 && (tid < GQ * 32 || ly.kv)) {
                        float* r = tid < GQ * 32 ? qs + (tid / 32) * DQ : kn;
                        const int i = tid % 32;
                        const float a = r[i], c = r[i + 32];
                        r[i] = bfr(a * rcos - c * rsin); r[i + 32] = bfr(c * rcos + a * rsin);
                    }
                    if (tid < GQ) { mr[tid] = -__int_as_float(0x7f800000); lr[tid] = 0.f; }
                    // o's running partial sums, a quarter of each tile's rows a warp: warp 0's in ob, warps 1-3's in
                    // the current tile's key rows (dead once its scores are taken; the tile before is released
                    // once they are carried over), so that no registers hold them through the scores
                    unsigned tile_d = 0, prev_d = 0;
                    const unsigned char* prev_ts = ring;
                    for (int t = 0; t < ntile; ++t) {
                        tile_d = gu % NDESC;
                        mbar_wait(smem_u32(full + tile_d), (gu / NDESC) & 1);
                        ++gu;
                        const unsigned char* ts = ring + doff[tile_d];
                        const int base = t * KTOT + k0, jv = max(0, min(KMAX, nv - base));
                        cons_sync();  // RoPE done (t = 0); the previous tile's p v done with scT
                        if (slot >= base && slot < base + KMAX) {
                            bf16_t* kst = (bf16_t*)(ts + CS_TK) + (slot - base) * DQ;
                            bf16_t* vst = (bf16_t*)(ts + CS_TV) + (slot - base) * DV;
                            if (tid >= GQ * 32 && tid < GQ * 32 + 32) {  // the key
                                const int i = tid - GQ * 32;
                                if (ly.kv) {
                                    bf16_t* kcl = ly.kc + ((unsigned long long)ag * ly.kv_rows + slot) * DQ;
                                    const bf16_t k1 = (bf16_t)bf16_bits(kn[i]), k2 = (bf16_t)bf16_bits(kn[i + 32]);
                                    kst[i] = k1; kst[i + 32] = k2; kcl[i] = k1; kcl[i + 32] = k2;
                                    if (!ly.glob) { keep[i] = k1; keep[i + 32] = k2; }
                                } else { kst[i] = keep[i]; kst[i + 32] = keep[i + 32]; }
                            } else if (tid >= GQ * 32 + 32 && tid < GQ * 32 + 64) {  // the value
                                const int i = tid - (GQ * 32 + 32);
                                if (ly.kv) {
                                    bf16_t* vcl = ly.vc + ((unsigned long long)ag * ly.kv_rows + slot) * DV;
                                    #pragma unroll
                                    for (int k = 0; k < 4; ++k) {
                                        const bf16_t v = (bf16_t)bf16_bits(vn[4 * i + k]);
                                        vst[4 * i + k] = v; vcl[4 * i + k] = v;
                                        if (!ly.glob) keep[DQ + 4 * i + k] = v;
                                    }
                                } else {
                                    #pragma unroll
                                    for (int k = 0; k < 4; ++k) vst[4 * i + k] = keep[DQ + 4 * i + k];
                                }
                            }
                            cons_sync();
                        }
                        // scores: 8 lanes a key, 16 bytes of its row each (a quarter-warp reads one whole row: no
                        // bank conflicts), this lane's 8 dimensions of the 5 q heads held in registers
                        {
                            const int sub = lane & 7, kw = lane >> 3;
                            float qr[GQ][8];
                            #pragma unroll
                            for (int hh = 0; hh < GQ; ++hh) {
                                const float4 a = *(const float4*)(qs + hh * DQ + sub * 8), c = *(const float4*)(qs + hh * DQ + sub * 8 + 4);
                                qr[hh][0] = a.x; qr[hh][1] = a.y; qr[hh][2] = a.z; qr[hh][3] = a.w;
                                qr[hh][4] = c.x; qr[hh][5] = c.y; qr[hh][6] = c.z; qr[hh][7] = c.w;
                            }
                            for (int j0 = warp * 4; j0 < KMAX; j0 += NWC * 4) {
                                const int j = j0 + kw;
                                float s[GQ];
                                #pragma unroll
                                for (int hh = 0; hh < GQ; ++hh) s[hh] = 0.f;
                                if (j < jv) {
                                    const uint4 w = ((const uint4*)(ts + CS_TK))[j * (DQ / 8) + sub];
                                    const float k8[8] = {__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u),
                                                         __uint_as_float(w.y << 16), __uint_as_float(w.y & 0xffff0000u),
                                                         __uint_as_float(w.z << 16), __uint_as_float(w.z & 0xffff0000u),
                                                         __uint_as_float(w.w << 16), __uint_as_float(w.w & 0xffff0000u)};
                                    #pragma unroll
                                    for (int hh = 0; hh < GQ; ++hh)
                                        #pragma unroll
                                        for (int d = 0; d < 8; ++d) s[hh] = fmaf(qr[hh][d], k8[d], s[hh]);
                                }
                                #pragma unroll
                                for (int hh = 0; hh < GQ; ++hh) {
                                    s[hh] += __shfl_xor_sync(0xffffffffu, s[hh], 1);
                                    s[hh] += __shfl_xor_sync(0xffffffffu, s[hh], 2);
                                    s[hh] += __shfl_xor_sync(0xffffffffu, s[hh], 4);
                                }
                                if (j < KMAX && sub < GQ) {
                                    const float v = sub == 0 ? s[0] : sub == 1 ? s[1] : sub == 2 ? s[2] : sub == 3 ? s[3] : s[4];
                                    scT[j * 8 + sub] = j < jv ? v * 0.125f : -__int_as_float(0x7f800000);
                                }
                            }
                        }
                        cons_sync();
                        // the tile's max per head over all consumer threads (a thread's entries t, t + NCONS, ...
                        // share head t % 8), the running max, p = exp(score - max), the sums; a head with no filled
                        // row yet keeps max -inf and p = 0 (never inf - inf)
                        {
                            const int hh = tid & 7;
                            float m = -__int_as_float(0x7f800000);
                            for (int e = tid; e < KMAX * 8; e += NCONS) m = fmaxf(m, scT[e]);
                            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
                            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
                            if (lane < 8) red8[warp * 8 + lane] = m;
                            cons_sync();
                            float M = hh < GQ ? mr[hh] : 0.f;
                            #pragma unroll
                            for (int w = 0; w < NWC; ++w) M = fmaxf(M, red8[w * 8 + hh]);
                            const float Mx = M == -__int_as_float(0x7f800000) ? 0.f : M;
                            float sum = 0.f;
                            for (int e = tid; e < KMAX * 8; e += NCONS) { const float p = __expf(scT[e] - Mx); scT[e] = p; sum += p; }
                            sum += __shfl_xor_sync(0xffffffffu, sum, 8);
                            sum += __shfl_xor_sync(0xffffffffu, sum, 16);
                            if (lane < 8) red8[NWC * 8 + warp * 8 + lane] = sum;
                            cons_sync();
                            if (tid < GQ) {
                                float L = 0.f;
                                #pragma unroll
                                for (int w = 0; w < NWC; ++w) L += red8[NWC * 8 + w * 8 + tid];
                                const float f = __expf(mr[tid] - Mx);  // 0 while the running max is -inf
                                scl[tid] = f; lr[tid] = lr[tid] * f + L; mr[tid] = M;
                            }
                            cons_sync();
                        }
                        // o = o * rescale + p v: warp w < 4 takes a quarter of the rows, a lane 4 dimensions of all
                        // 5 heads
                        if (warp < 4) {
                            float o[GQ][4];
                            float* mine = warp == 0 ? ob : (float*)(ts + CS_TK) + (warp - 1) * GQ * DV;
                            const float* was = warp == 0 ? ob : (const float*)(prev_ts + CS_TK) + (warp - 1) * GQ * DV;
                            #pragma unroll
                            for (int hh = 0; hh < GQ; ++hh) {
                                const float f = scl[hh];
                                const float4 w = t > 0 ? *(const float4*)(was + hh * DV + 4 * lane) : make_float4(0.f, 0.f, 0.f, 0.f);
                                o[hh][0] = w.x * f; o[hh][1] = w.y * f; o[hh][2] = w.z * f; o[hh][3] = w.w * f;
                            }
                            const int je = min((warp + 1) * (KMAX / 4), jv);
                            #pragma unroll 4
                            for (int j = warp * (KMAX / 4); j < je; ++j) {
                                const uint2 v = ((const uint2*)(ts + CS_TV))[j * (DV / 4) + lane];
                                const float4 p0 = *(const float4*)(scT + j * 8), p1 = *(const float4*)(scT + j * 8 + 4);
                                const float vf[4] = {__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u),
                                                     __uint_as_float(v.y << 16), __uint_as_float(v.y & 0xffff0000u)};
                                const float pp[GQ] = {p0.x, p0.y, p0.z, p0.w, p1.x};
                                #pragma unroll
                                for (int hh = 0; hh < GQ; ++hh)
                                    #pragma unroll
                                    for (int k = 0; k < 4; ++k) o[hh][k] = fmaf(pp[hh], vf[k], o[hh][k]);
                            }
                            #pragma unroll
                            for (int hh = 0; hh < GQ; ++hh) *(float4*)(mine + hh * DV + 4 * lane) = make_float4(o[hh][0], o[hh][1], o[hh][2], o[hh][3]);
                        }
                        if (t > 0) {  // the tile before: its rows are carried over, its stage goes back to the ring
                            cons_sync();
                            if (tid == 0) mbar_arrive(smem_u32(empty + prev_d));
                        }
                        prev_d = tile_d; prev_ts = ts;
                    }
                    const unsigned char* ts = prev_ts;  // the last tile: its key rows hold warps 1-3's sums
                    if (tid < GQ) { ml[tid] = mr[tid]; ml[GQ + tid] = lr[tid]; }
                    else if (tid < GQ + 2) ml[tid + GQ] = 0.f;
                    cons_sync();
                    // to each rank: m, l and the slice of o it merges
                    constexpr int NV4 = XREC / 4;
                    if (tid < CLN * NV4) {
                        const int peer = tid / NV4, k = tid % NV4;
                        float4 v;
                        if (k < 3) v = *(const float4*)(ml + 4 * k);
                        else {
                            const int e = peer * NM + 4 * (k - 3);
                            const float* pk = (const float*)(ts + CS_TK);
                            const float4 a = *(const float4*)(ob + e), b1 = *(const float4*)(pk + e),
                                         b2 = *(const float4*)(pk + GQ * DV + e), b3 = *(const float4*)(pk + 2 * GQ * DV + e);
                            v = make_float4(a.x + b1.x + b2.x + b3.x, a.y + b1.y + b2.y + b3.y, a.z + b1.z + b2.z + b3.z, a.w + b1.w + b2.w + b3.w);
                        }
                        st_async_v4(mapa(smem_u32(xr + rank * XREC + 4 * k), peer), v, mapa(cbr, peer));
                    }
                    cluster_wait();  // (its barrier also ends the reads of the last tile, which goes back to the ring)
                    if (tid == 0) mbar_arrive(smem_u32(empty + tile_d));
                    // out_proj's norm weights: the stage after the tiles
                    chd = gu % NDESC;
                    mbar_wait(smem_u32(full + chd), (gu / NDESC) & 1);
                    ++gu;
                    // merge the CLN partial softmaxes of this rank's NM outputs
                    if (tid < NM) {
                        const int e = rank * NM + tid, hh = e / DV;
                        float M = -__int_as_float(0x7f800000);
                        #pragma unroll
                        for (int s = 0; s < CLN; ++s) M = fmaxf(M, xr[s * XREC + hh]);
                        float Ls = 0.f, O = 0.f;
                        #pragma unroll
                        for (int s = 0; s < CLN; ++s) {
                            const float f = __expf(xr[s * XREC + hh] - M);
                            Ls = fmaf(xr[s * XREC + GQ + hh], f, Ls); O = fmaf(xr[s * XREC + 12 + tid], f, O);
                        }
                        st_relaxed32(bufm + ag * GQ * DV + e, (bf16_bits(O / Ls) << 16) | want);
                    }
                } else if (r_ssm) {
                    // the conv update of the block's channels
                    if (tid < CPB) {
                        const float4 s = ((const float4*)(cs + CS_CS))[tid], w = ((const float4*)(cs + CS_CW))[tid];
                        const float x = us[tid];
                        us[tid] = bfr(silu(((const float4*)(cs + CS_CP))[tid].x + w.x * s.x + w.y * s.y + w.z * s.z + w.w * x));
                        ((float4*)ly.cst)[c0 + tid] = make_float4(s.y, s.z, x, 0.f);
                    }
                    cons_sync();
                    // x_proj's partial sums over the block's channels: warp w takes channels w, w + NWC, ...; a
                    // lane takes outputs lane, lane + 32, ...
                    {
                        float a[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
                        for (int c = warp; c < CPB; c += NWC) {
                            const float u = us[c];
                            const bf16_t* wr = (const bf16_t*)(cs + CS_WX) + c * XWP;
                            #pragma unroll
                            for (int i = 0; i < 5; ++i) if (lane + 32 * i < XW) a[i] = fmaf(bf2f(wr[lane + 32 * i]), u, a[i]);
                        }
                        #pragma unroll
                        for (int i = 0; i < 5; ++i) if (lane + 32 * i < XW) r7[warp * 136 + lane + 32 * i] = a[i];
                    }
                    cons_sync();
                    // reduce-scatter in the cluster: output j to rank j / XO (outputs past XW send 0)
                    if (tid < CLN * XO) {
                        float s = 0.f;
                        if (tid < XW) {
                            #pragma unroll
                            for (int w = 0; w < NWC; ++w) s += r7[w * 136 + tid];
                        }
                        const int peer = tid / XO, k = tid % XO;
                        st_async(mapa(smem_u32(xr + rank * XO + k), peer), __float_as_uint(s), mapa(cbr, peer));
                    }
                    cluster_wait();
                    // this rank's outputs summed over the cluster, then over the SSM clusters
                    const int scl = (b - ATTB) / CLN;
                    const unsigned t32 = tag32(gv, l, 0);
                    if (tid < XO) {
                        float s = 0.f;
                        #pragma unroll
                        for (int snd = 0; snd < CLN; ++snd) s += xr[snd * XO + tid];
                        const int j = rank * XO + tid;
                        if (j < XW) st_relaxed64(xg + ((unsigned long long)pb * SSMC + scl) * XW + j, ((unsigned long long)t32 << 32) | __float_as_uint(s));
                    }
                    if (tid < XW) {  // every SSM cluster's sums, tagged words polled in place, added in cluster order
                        float v[SSMC];
                        bool good[SSMC];
                        #pragma unroll
                        for (int q = 0; q < SSMC; ++q) good[q] = false;
                        for (;;) {
                            bool ok = true;
                            #pragma unroll
                            for (int q = 0; q < SSMC; ++q)
                                if (!good[q]) {
                                    const unsigned long long w = ld_poll64(xg + ((unsigned long long)pb * SSMC + q) * XW + tid);
                                    good[q] = (unsigned)(w >> 32) == t32; v[q] = __uint_as_float((unsigned)w); ok = ok && good[q];
                                }
                            if (ok) break;
                            if (WAIT_OVER(tp0)) { GIVE_UP(4u); break; }
                        }
                        float s = 0.f;
                        #pragma unroll
                        for (int q = 0; q < SSMC; ++q) s += v[q];
                        sv[tid] = bfr(s);
                    }
                    cons_sync();
                    if (warp < 3) {  // RMS norms of dt_in (warp 0), B (1), C (2), in place
                        const int o = warp == 0 ? 0 : (warp == 1 ? RDT : RDT + NS), n = warp == 0 ? RDT : NS;
                        const float* nxs = (const float*)(cs + CS_NX);
                        float s = 0.f;
                        for (int j = lane; j < n; j += 32) s += sv[o + j] * sv[o + j];
                        const float inv = rsqrtf(warp_sum(s) / n + EPS);
                        __syncwarp();
                        for (int j = lane; j < n; j += 32) sv[o + j] = bfr(sv[o + j] * inv * nxs[o + j]);
                    }
                    cons_sync();
                    {  // SSMT threads a channel: dt_proj's dot, then NS / SSMT states each (every warp whole, for the shuffles)
                        const bool valid = tid < CPB * SSMT;
                        const int j = valid ? tid / SSMT : 0, sub = tid % SSMT;
                        const bf16_t* dr = (const bf16_t*)(cs + CS_DT) + j * RDTP;
                        float a = 0.f;
                        #pragma unroll
                        for (int r = sub; r < RDT; r += SSMT) a = fmaf(sv[r], bf2f(dr[r]), a);
                        #pragma unroll
                        for (int o = SSMT / 2; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
                        const float4 cp = ((const float4*)(cs + CS_CP))[j];
                        const float y0 = bfr(a) + cp.y;
                        const float dt = y0 > 20.f ? y0 : log1pf(__expf(y0));
                        const float u = us[j];
                        const float* s = (const float*)(cs + CS_S) + j * NS;
                        const float* A = (const float*)(cs + CS_A) + j * NS;
                        float* so = ly.sst + (unsigned long long)(c0 + j) * NS;
                        float y = 0.f;
                        #pragma unroll
                        for (int k = 0; k < NS / SSMT; ++k) {
                            const int n = sub * (NS / SSMT) + k;
                            const float sn = __expf(dt * A[n]) * s[n] + dt * sv[RDT + n] * u;
                            if (valid) so[n] = sn;
                            y = fmaf(sv[RDT + NS + n], sn, y);
                        }
                        #pragma unroll
                        for (int o = SSMT / 2; o; o >>= 1) y += __shfl_xor_sync(0xffffffffu, y, o);
                        if (valid && sub == 0) {
                            y = fmaf(cp.z, u, y);
                            st_relaxed32(bufm + D + c0 + j, (bf16_bits(y * silu(zs[j])) << 16) | want);
                        }
                    }
                }
            }
            // ---- stage the operand: poll its tagged words in place, then (in_proj, gate/up) the RMS norm
            if (p == 0 || p == 2) {
                constexpr int Q = (H / 2 + NCONS - 1) / NCONS;  // pairs of values a thread
                const unsigned want = p == 0 ? tag32(gv, l - 1, 3) : tag32(gv, l, 1);
                float2 v[Q];
                if (p == 0 && l == l0) {
                    #pragma unroll
                    for (int q = 0; q < Q; ++q) { const int j = tid + q * NCONS; if (j < H / 2) v[q] = ((const float2*)h_in)[j]; }
                } else {
                    bool good[Q];
                    #pragma unroll
                    for (int q = 0; q < Q; ++q) good[q] = tid + q * NCONS >= H / 2;
                    for (;;) {
                        bool ok = true;
                        #pragma unroll
                        for (int q = 0; q < Q; ++q)
                            if (!good[q]) {
                                const ulonglong2 u = ld_poll2x64(hw + 2 * (tid + q * NCONS));
                                v[q] = make_float2(__uint_as_float((unsigned)u.x), __uint_as_float((unsigned)u.y));
                                good[q] = (unsigned)(u.x >> 32) == want && (unsigned)(u.y >> 32) == want;
                                ok = ok && good[q];
                            }
                        if (ok) break;
                        if (WAIT_OVER(tp0)) { GIVE_UP(8u); break; }
                    }
                }
                const float* nwl = ly.nw + (p == 2) * H;
                float ss = 0.f;
                #pragma unroll
                for (int q = 0; q < Q; ++q) if (tid + q * NCONS < H / 2) ss += v[q].x * v[q].x + v[q].y * v[q].y;
                ss = warp_sum(ss);
                if (lane == 0) red[warp] = ss;
                cons_sync();
                float tot = 0.f;
                #pragma unroll
                for (int i = 0; i < NWC; ++i) tot += red[i];
                const float inv = rsqrtf(tot / H + EPS);
                #pragma unroll
                for (int q = 0; q < Q; ++q) {
                    const int j = tid + q * NCONS;
                    if (j < H / 2) {
                        const float2 wn = ((const float2*)nwl)[j];
                        ((unsigned*)xs)[j] = bf16_bits(v[q].x * inv * wn.x) | (bf16_bits(v[q].y * inv * wn.y) << 16);
                    }
                }
            } else if (p == 1) {
                // out_proj's operand: the attention and SSM outputs (tagged), their RMS norms, the average. A thread
                // holds 4 attention values and the 4 SSM values of the same channels, so the average is its own.
                constexpr int Q = (D / 4 + NCONS - 1) / NCONS;
                const unsigned want = tag32(gv, l, 0) & 0xffffu;
                uint4 va[Q], vs[Q];
                bool good[Q];
                #pragma unroll
                for (int q = 0; q < Q; ++q) good[q] = tid + q * NCONS >= D / 4;
                for (;;) {
                    bool ok = true;
                    #pragma unroll
                    for (int q = 0; q < Q; ++q)
                        if (!good[q]) {
                            va[q] = ld_poll4(bufm + 4 * (tid + q * NCONS));
                            vs[q] = ld_poll4(bufm + D + 4 * (tid + q * NCONS));
                            good[q] = (va[q].x & 0xffffu) == want && (va[q].y & 0xffffu) == want && (va[q].z & 0xffffu) == want && (va[q].w & 0xffffu) == want
                                   && (vs[q].x & 0xffffu) == want && (vs[q].y & 0xffffu) == want && (vs[q].z & 0xffffu) == want && (vs[q].w & 0xffffu) == want;
                            ok = ok && good[q];
                        }
                    if (ok) break;
                    if (WAIT_OVER(tp0)) { GIVE_UP(16u); break; }
                }
                float sa = 0.f, ssm = 0.f;
                #pragma unroll
                for (int q = 0; q < Q; ++q)
                    if (tid + q * NCONS < D / 4) {
                        const unsigned* a = (const unsigned*)&va[q]; const unsigned* s = (const unsigned*)&vs[q];
                        #pragma unroll
                        for (int k = 0; k < 4; ++k) {
                            const float x = __uint_as_float(a[k] & 0xffff0000u), y = __uint_as_float(s[k] & 0xffff0000u);
                            sa += x * x; ssm += y * y;
                        }
                    }
                sa = warp_sum(sa); ssm = warp_sum(ssm);
                if (lane == 0) { red[warp] = sa; red[16 + warp] = ssm; }
                cons_sync();
                float ta = 0.f, ts = 0.f;
                #pragma unroll
                for (int i = 0; i < NWC; ++i) { ta += red[i]; ts += red[16 + i]; }
                const float ia = rsqrtf(ta / D + EPS), is = rsqrtf(ts / D + EPS);
                const uint2* n1 = (const uint2*)(ring + doff[chd] + CS_NAV);  // 4 bf16 weights a thread-load
                const uint2* n2 = n1 + D / 4;
                #pragma unroll
                for (int q = 0; q < Q; ++q) {
                    const int j = tid + q * NCONS;
                    if (j < D / 4) {
                        const unsigned* a = (const unsigned*)&va[q]; const unsigned* s = (const unsigned*)&vs[q];
                        const uint2 w1 = n1[j], w2 = n2[j];
                        const float w1v[4] = {__uint_as_float(w1.x << 16), __uint_as_float(w1.x & 0xffff0000u), __uint_as_float(w1.y << 16), __uint_as_float(w1.y & 0xffff0000u)};
                        const float w2v[4] = {__uint_as_float(w2.x << 16), __uint_as_float(w2.x & 0xffff0000u), __uint_as_float(w2.y << 16), __uint_as_float(w2.y & 0xffff0000u)};
                        unsigned r[4];
                        #pragma unroll
                        for (int k = 0; k < 4; ++k) {
                            const float x = bfr(__uint_as_float(a[k] & 0xffff0000u) * ia * w1v[k]);
                            const float y = bfr(__uint_as_float(s[k] & 0xffff0000u) * is * w2v[k]);
                            r[k] = bf16_bits((x + y) * 0.5f);
                        }
                        ((uint2*)xs)[j] = make_uint2(r[0] | (r[1] << 16), r[2] | (r[3] << 16));
                    }
                }
            } else {  // down: the gated activations
                constexpr int Q = (I / 4 + NCONS - 1) / NCONS;  // 4 tagged words a thread-load
                const unsigned want = tag32(gv, l, 2) & 0xffffu;
                uint4 v[Q];
                bool good[Q];
                #pragma unroll
                for (int q = 0; q < Q; ++q) good[q] = tid + q * NCONS >= I / 4;
                for (;;) {
                    bool ok = true;
                    #pragma unroll
                    for (int q = 0; q < Q; ++q)
                        if (!good[q]) {
                            v[q] = ld_poll4(buf2 + 4 * (tid + q * NCONS));
                            good[q] = (v[q].x & 0xffffu) == want && (v[q].y & 0xffffu) == want && (v[q].z & 0xffffu) == want && (v[q].w & 0xffffu) == want;
                            ok = ok && good[q];
                        }
                    if (ok) break;
                    if (WAIT_OVER(tp0)) { GIVE_UP(32u); break; }
                }
                #pragma unroll
                for (int q = 0; q < Q; ++q) {
                    const int j = tid + q * NCONS;
                    if (j < I / 4) ((uint2*)xs)[j] = make_uint2((v[q].x >> 16) | (v[q].y & 0xffff0000u), (v[q].z >> 16) | (v[q].w & 0xffff0000u));
                }
            }
            cons_sync();
            if (p == 1 && tid == 0) mbar_arrive(smem_u32(empty + chd));  // the chain stage is read: its ring space back
            // ---- this block's stages of the product: each warp sums whole stages of its own ring
            int rb, re;
            row_range(p == 0 ? ly.n_in : (p == 2 ? I : H), b, G, rb, re);
            const int rg = p_rg(p), U = (re - rb + rg - 1) / rg;
            for (int u = 0; u < U; ++u, ++gu) {
                if ((int)(gu % NWC) != warp) continue;
                const unsigned d = gu % NDESC, ph = (gu / NDESC) & 1;
                mbar_wait(smem_u32(full + d), ph);
                const uint4* W = (const uint4*)(ring + doff[d]);
                const unsigned ebar = smem_u32(empty + d);
                switch (p) {
                    case 0: unit_dot<RG0, H / 8>(W, xs, lane, ebar, part + u * PST); break;
                    case 1: unit_dot<RG1, D / 8>(W, xs, lane, ebar, part + u * PST); break;
                    case 2: unit_dot<2 * RG2, H / 8>(W, xs, lane, ebar, part + u * PST); break;
                    default: unit_dot<RG3, I / 8>(W, xs, lane, ebar, part + u * PST); break;
                }
            }
            cons_sync();
            // ---- epilogue: one tagged store per output (the last layer's residual also plain, for what follows)
            const unsigned t32 = tag32(gv, l, p);
            for (int t = tid; t < re - rb; t += NCONS) {
                const int g = t / rg, i = t % rg;
                const float v = part[g * PST + i];
                if (p == 0) st_relaxed32(buf0 + rb + t, (bf16_bits(v) << 16) | (t32 & 0xffffu));
                else if (p == 2) {
                    const float u = part[g * PST + rg + i];
                    st_relaxed32(buf2 + rb + t, (bf16_bits(v / (1.f + __expf(-v)) * u) << 16) | (t32 & 0xffffu));
                } else {
                    const float hv = hloc[t] + v;
                    hloc[t] = hv;
                    st_relaxed64(hw + rb + t, ((unsigned long long)t32 << 32) | __float_as_uint(hv));
                    // a wait of this block that gave up, now or in an earlier step, poisons its rows of the result:
                    // the logits turn NaN, the sampler returns no token, and the engine stops using this kernel
                    // (engine/generate.py)
                    if (p == 3 && l == l1 - 1) h_out[rb + t] = *failed ? __int_as_float(0x7fc00000) : hv;
                }
            }
        }
    }
    // no block leaves while a peer may still store into its shared memory (an st.async into a block that has left
    // traps): once a wait has given up, a block can run ahead of its cluster (the producer warp has left: it is not
    // counted)
    asm volatile("barrier.cluster.arrive.release;\n barrier.cluster.wait.acquire;" ::: "memory");
}
