/* Load a kernel module with one finit_module() call and report the kernel's answer,
 * the way a rootkit's dropper does. busybox insmod retries a failed finit_module()
 * with init_module(), which would run a deliberately failing module init twice.
 *
 *   modload FILE.ko [PARAMS]   exit status 0 if the init succeeded, else the errno */
#include <asm/unistd.h>

static long sys(long n, long a, long b, long c) {
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return ret;
}

static int run(int argc, char **argv) {
	if (argc < 2)
		return 2;
	long fd = sys(__NR_openat, -100, (long)argv[1], 0);
	if (fd < 0)
		return (int)-fd;
	long rc = sys(__NR_finit_module, fd, (long)(argc > 2 ? argv[2] : ""), 0);
	return rc < 0 ? (int)-rc : 0;
}

__attribute__((used)) static void start(long *sp) {
	sys(__NR_exit_group, run((int)sp[0], (char **)(sp + 1)), 0, 0);
}
__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start\n");
