/* Memory read bandwidth: sums a buffer much larger than the caches with 1..N threads (OpenMP).
 * Decode speed is bounded by this figure divided by the bytes of weights read per token.
 * Build: gcc -O3 -march=native -fopenmp membw.c -o membw ; run: ./membw [MiB] [reps] */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 1024;
    int reps = argc > 2 ? atoi(argv[2]) : 5;
    size_t n = mib * 1024 * 1024 / sizeof(float);
    float *a = malloc(n * sizeof(float));
    if (!a) { perror("malloc"); return 1; }
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 1023);
    int maxt = omp_get_max_threads();
    for (int t = 1; t <= maxt; t++) {
        double best = 0, sink = 0;
        for (int r = 0; r < reps; r++) {
            double t0 = now();
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp parallel for num_threads(t) reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
            for (size_t i = 0; i < n; i += 8) {
                s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3];
                s4 += a[i + 4]; s5 += a[i + 5]; s6 += a[i + 6]; s7 += a[i + 7];
            }
            double dt = now() - t0;
            sink += s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
            double gbs = n * sizeof(float) / dt / 1e9;
            if (gbs > best) best = gbs;
        }
        printf("{\"threads\": %d, \"read_GBps\": %.2f, \"checksum\": %.0f}\n", t, best, sink);
    }
    free(a);
    return 0;
}
