// A native backtrace on SIGSEGV for the GPU machine, which has no gdb (docs/PERF.md entry 14).
//   gcc -shared -fPIC -O0 -o /tmp/segv.so scripts/segv_backtrace.c -ldl
//   LD_PRELOAD=/tmp/segv.so python3 script.py      # not under pytest: its faulthandler replaces this
// then resolve the frames of our extension there:
//   addr2line -f -C -i -e oasis_kernels/_C*.so 0xOFFSET
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <dlfcn.h>
static void on_segv(int sig, siginfo_t* info, void* ctx) {
  void* frames[64];
  int n = backtrace(frames, 64);
  fprintf(stderr, "SEGV at %p, %d frames\n", info->si_addr, n);
  for (int i = 0; i < n; ++i) {
    Dl_info d;
    if (dladdr(frames[i], &d) && d.dli_fname) {
      fprintf(stderr, "#%d %s +0x%lx (%s)\n", i, d.dli_fname, (unsigned long)((char*)frames[i] - (char*)d.dli_fbase),
              d.dli_sname ? d.dli_sname : "?");
    } else {
      fprintf(stderr, "#%d %p\n", i, frames[i]);
    }
  }
  _exit(139);
}
__attribute__((constructor)) static void install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, NULL);
}
