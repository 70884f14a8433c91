/* Stand-in for the CUDA toolkit's cuda_runtime.h, used only when nccl-sys runs bindgen on nccl.h.
 * nccl.h needs exactly two CUDA types (and size_t), both opaque handles. They are declared here the way the CUDA
 * runtime declares them (pointers to incomplete structs), so the bindings are ABI-identical and no CUDA
 * toolkit is needed to generate them. CUDART_VERSION is left undefined on purpose: nccl.h then skips
 * cuda_bf16.h and cuda_fp8.h, which declare nothing nccl.h's API uses. */
#ifndef NCCL_SYS_CUDA_RUNTIME_STUB_H
#define NCCL_SYS_CUDA_RUNTIME_STUB_H
#include <stddef.h> /* size_t, which the real cuda_runtime.h brings in too */
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
#endif
