/* Threading for the compiled CPU loops (model/cpu_kernels.py).
 *
 * Built with -fopenmp, PARALLEL_FOR(threads) shares the loop that follows among `threads`
 * threads. The library then links libgomp by its soname, so in a process that imported
 * torch (whose CPU build ships libgomp.so.1) it joins torch's own OpenMP runtime and
 * thread team: no second pool, and no threads of ours competing for cores with torch's
 * workers, which keep spinning for a while after each of torch's parallel regions.
 * Built without OpenMP, the pragma is empty and the caller splits the batch rows among
 * Python threads instead (cpu_kernels_openmp() tells it which).
 */
#include <stdint.h>

#ifdef _OPENMP
#define PARALLEL_FOR(threads) _Pragma("omp parallel for num_threads(threads) schedule(static)")
#else
#define PARALLEL_FOR(threads)
#endif

/* 1 when this library shares its loops among threads itself (built with OpenMP); each
 * library that includes this header exports it. */
int64_t cpu_kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
