/* OpenMPI reference for the host backend: MPI_Allreduce (float sum) from 8 B to 64 MiB, average time per call
 * on rank 0 after a warm-up, with the same sizes and iteration counts as nccl/benches/host_table.rs.
 *
 *   mpicc -O2 -o allreduce bench/mpi/allreduce.c
 *   mpirun --allow-run-as-root --oversubscribe -np 2 ./allreduce
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

static long iters_for(long bytes) {
    long it = (256L << 20) / (bytes > 0 ? bytes : 1);
    if (it < 5) it = 5;
    if (it > 20000) it = 20000;
    return it;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const long max = 64L << 20;
    float *send = malloc(max), *recv = malloc(max);
    for (long i = 0; i < max / 4; i++) send[i] = (float)(i % 17);
    static const long sizes[] = {8, 64, 512, 4096, 32768, 262144, 1048576, 4194304, 16777216, 67108864};
    if (rank == 0) printf("# MPI_Allreduce float sum, %d ranks\n%10s %12s %9s\n", size, "bytes", "time_us", "algbw_GB/s");
    for (unsigned s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        long bytes = sizes[s], n = bytes / 4, it = iters_for(bytes);
        for (long i = 0; i < (it < 1000 ? it : 1000); i++) MPI_Allreduce(send, recv, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t = MPI_Wtime();
        for (long i = 0; i < it; i++) MPI_Allreduce(send, recv, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double el = (MPI_Wtime() - t) / (double)it;
        if (recv[n - 1] != (float)size * (float)((n - 1) % 17)) { fprintf(stderr, "wrong result at %ld bytes\n", bytes); return 1; }
        MPI_Barrier(MPI_COMM_WORLD);
        if (rank == 0) printf("%10ld %12.2f %9.2f\n", bytes, el * 1e6, (double)bytes / el / 1e9);
    }
    free(send);
    free(recv);
    MPI_Finalize();
    return 0;
}
