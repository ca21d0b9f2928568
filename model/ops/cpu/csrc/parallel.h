/* Threading for the compiled CPU loops (model/ops/cpu/__init__.py).
 *
 * Built with -fopenmp, PARALLEL_FOR(threads) shares the loop that follows among `threads`
 * threads. The library then links libgomp by its soname, so in a process that imported
 * torch (whose CPU build ships libgomp.so.1) it joins torch's own OpenMP runtime and
 * thread team: no second pool, and no threads of ours competing for cores with torch's
 * workers, which keep spinning for a while after each of torch's parallel regions.
 * Built without OpenMP, the pragma is empty and the caller splits the batch rows among
 * Python threads instead (cpu_kernels_openmp() tells it which). THREAD_ID() is the
 * running thread's index in the team (0 without OpenMP), for per-thread scratch.
 */
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#define PARALLEL_FOR(threads) _Pragma("omp parallel for num_threads(threads) schedule(static)")
#define THREAD_ID() ((int64_t)omp_get_thread_num())
#else
#define PARALLEL_FOR(threads)
#define THREAD_ID() ((int64_t)0)
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
