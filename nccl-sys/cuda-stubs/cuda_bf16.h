/* Empty stand-in for the CUDA toolkit's cuda_bf16.h: nccl.h includes it, but its API uses none of its types. */
