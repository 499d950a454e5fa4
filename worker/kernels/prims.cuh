// The few GPU primitives the kernels (attention, normalisation, loss, optimizer) use, in one place: on the GPU they
// are CUDA intrinsics and inline PTX (sm_80+ for the tensor-core ones); with LOCKSTEP_EMULATE defined they come from
// emulate/emu.h, a host implementation of the same documented semantics, so that the kernels' index arithmetic can be
// run and checked on a machine without a GPU (emulate/*_emu.cpp). Kernels use only what is declared here, plus
// threadIdx/blockIdx/gridDim/blockDim, __shared__ arrays and the float functions expf, logf, tanhf, sqrtf, rsqrtf,
// fabsf, fmaxf, isfinite.
#pragma once

#include <stdint.h>

#ifdef LOCKSTEP_EMULATE
#include "emulate/emu.h"
#else
#include <cuda_bf16.h>

#define DEV __device__ __forceinline__
#define HD __host__ __device__

typedef __nv_bfloat16 bf16;

DEV float to_f32(float x) { return x; }
DEV float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> DEV T from_f32(float x);
template <> DEV float from_f32<float>(float x) { return x; }
template <> DEV bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Two floats as two bf16 in one 32-bit register, `lo` in the low half: the element order of an mma fragment.
DEV uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

DEV float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

DEV void block_sync() { __syncthreads(); }

DEV unsigned char *dynamic_smem() {
    extern __shared__ __align__(16) unsigned char lockstep_dynamic_smem[];
    return lockstep_dynamic_smem;
}

DEV uint32_t dynamic_smem_size() {
    uint32_t n;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(n));
    return n;
}

// A launch whose dynamic shared memory is smaller than the kernel's carve-up is a bug on the host side: stop
// rather than write past the block's shared memory.
DEV void fail_launch() { __trap(); }

DEV uint32_t smem_addr(const void *p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i (16-byte aligned), and lane l receives
// in r[i] the elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix i; `.trans` delivers the transposed matrices.
DEV void ldmatrix_x4(uint32_t (&r)[4], const bf16 *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

DEV void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16 *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// d += a·b for a 16x16 bf16 A (row-major fragment a[4]), a 16x8 bf16 B (column fragment b0, b1) and a 16x8 f32
// accumulator d[4]. With g = lane/4, t = lane%4: a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..),
// a[3] = A(g+8, 2t+8..); b0 = B(2t..2t+1, g), b1 = B(2t+8.., g); d[0..2] = D(g, 2t..2t+1), d[2..4] = D(g+8, 2t..).
DEV void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared without passing through registers; `valid == false` writes 16 zero bytes and reads
// nothing (the source address must still be a mapped one).
DEV void cp_async_16(void *smem, const void *gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
}

DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N> DEV void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

#endif

// Reductions over the 32 lanes of a warp (every lane gets the result); the butterfly order is fixed, so the result
// does not depend on scheduling.
DEV float warp_sum(float v) {
    for (int m = 16; m > 0; m >>= 1) v += shfl_xor(v, m);
    return v;
}

DEV float warp_max(float v) {
    for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
    return v;
}

