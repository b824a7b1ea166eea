/* A fileless loader: copy a program into an anonymous memfd and execute it from
 * there (execveat with AT_EMPTY_PATH), the way in-memory droppers run payloads that
 * never touch a file system. Static and libc-free, like the other guest tools.
 *
 *   memfdexec PROGRAM ARGV0 [ARGS...]   runs PROGRAM's bytes as ARGV0 ARGS... */
#include <asm/unistd.h>
#include <linux/fcntl.h>

static long sys(long n, long a, long b, long c, long d, long e) {
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}

static char buf[65536];

static int run(int argc, char **argv, char **envp) {
	if (argc < 3)
		return 2;
	long src = sys(__NR_openat, AT_FDCWD, (long)argv[1], 0, 0, 0);
	long mfd = sys(__NR_memfd_create, (long)"payload", 0, 0, 0, 0);
	if (src < 0 || mfd < 0)
		return 3;
	for (;;) {
		long got = sys(__NR_read, src, (long)buf, sizeof buf, 0, 0);
		if (got < 0)
			return 4;
		if (got == 0)
			break;
		for (long off = 0; off < got;) {
			long put = sys(__NR_write, mfd, (long)buf + off, got - off, 0, 0);
			if (put <= 0)
				return 5;
			off += put;
		}
	}
	sys(__NR_close, src, 0, 0, 0, 0);
	sys(__NR_execveat, mfd, (long)"", (long)(argv + 2), (long)envp, AT_EMPTY_PATH);
	return 6;
}

__attribute__((used)) static void start(long *sp) {
	int argc = (int)sp[0];
	char **argv = (char **)(sp + 1);
	sys(__NR_exit_group, run(argc, argv, argv + argc + 1), 0, 0, 0, 0);
}
__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start\n");
