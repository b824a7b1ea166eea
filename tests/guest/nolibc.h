/* What the static, libc-free guest tools share: a raw system call and an entry point
 * that hands run() the kernel's argc/argv/envp. Tools are a few kilobytes, so they
 * cross the lab's serial console quickly (tests/conftest.py guest_tool, push). */
#include <asm/unistd.h>

static long sys(long n, long a, long b, long c, long d, long e) {
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}

static int run(int argc, char **argv, char **envp);

/* The kernel enters with argc at the stack pointer, argv above it, then envp. */
__attribute__((used)) static void start(long *sp) {
	int argc = (int)sp[0];
	char **argv = (char **)(sp + 1);
	sys(__NR_exit_group, run(argc, argv, argv + argc + 1), 0, 0, 0, 0);
}
__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start\n");
