/* Load a kernel module with one finit_module() call and report the kernel's answer,
 * the way a rootkit's dropper does. busybox insmod retries a failed finit_module()
 * with init_module(), which would run a deliberately failing module init twice.
 *
 *   modload FILE.ko [PARAMS]   exit status 0 if the init succeeded, else the errno */
#include "nolibc.h"

static int run(int argc, char **argv, char **envp) {
	(void)envp;
	if (argc < 2)
		return 2;
	long fd = sys(__NR_openat, -100, (long)argv[1], 0, 0, 0);
	if (fd < 0)
		return (int)-fd;
	long rc = sys(__NR_finit_module, fd, (long)(argc > 2 ? argv[2] : ""), 0, 0, 0);
	return rc < 0 ? (int)-rc : 0;
}
