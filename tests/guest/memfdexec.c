/* A fileless loader: copy a program into an anonymous memfd and execute it from
 * there (execveat with AT_EMPTY_PATH), the way in-memory droppers run payloads that
 * never touch a file system. Static and libc-free, like the other guest tools.
 *
 *   memfdexec PROGRAM ARGV0 [ARGS...]   runs PROGRAM's bytes as ARGV0 ARGS... */
#include <linux/fcntl.h>

#include "nolibc.h"

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
