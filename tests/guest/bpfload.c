/* An eBPF loader the way TripleCross, ebpfkit and boopkit load theirs: raw bpf()
 * and perf_event_open() system calls, no libbpf. Built on the host, static and
 * without libc (a few kilobytes, so it crosses the serial console quickly), run in
 * the lab guest by tests/integration/test_bpf.py.
 *
 *   bpfload kprobe SYMBOL NAME [write]  kprobe program on SYMBOL through the kprobe PMU
 *   bpfload rawtp TRACEPOINT NAME [write]  raw tracepoint program through a bpf link
 *   bpfload socket NAME                  a socket filter, loaded and not attached
 *
 * "write" makes the program call bpf_probe_write_user (what rewrites getdents64
 * results in user memory); otherwise it calls bpf_get_current_pid_tgid (a socket
 * filter, bpf_get_prandom_u32). The loader
 * then prints "loaded" and waits, holding the program's file descriptors. */
#include <linux/bpf.h>
#include <linux/perf_event.h>

#include "nolibc.h"

typedef unsigned long u64;

static unsigned long len(const char *s) { unsigned long n = 0; while (s[n]) n++; return n; }
static int eq(const char *a, const char *b) { while (*a && *a == *b) a++, b++; return *a == *b; }
static void say(const char *s) { sys(__NR_write, 1, (long)s, len(s), 0, 0); }
static void die(const char *what, long err) {
	char num[24]; int i = 23; unsigned long v = -err;
	num[i] = 0;
	do num[--i] = '0' + v % 10; while (v /= 10);
	say("bpfload: "); say(what); say(" failed: errno "); say(num + i); say("\n");
	sys(__NR_exit_group, 1, 0, 0, 0, 0);
}
static void zero(void *p, unsigned long n) { char *c = p; while (n--) *c++ = 0; }
static void copy(char *dst, const char *src, unsigned long n) { while (n-- && *src) *dst++ = *src++; }

#define INSN(c, d, s, o, i) ((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })

static long load(unsigned type, const char *name, int write) {
	struct bpf_insn prog[] = {
		INSN(BPF_ALU64 | BPF_MOV | BPF_K, 1, 0, 0, 0),          /* r1 = 0 */
		INSN(BPF_STX | BPF_MEM | BPF_DW, 10, 1, -8, 0),         /* *(u64 *)(fp - 8) = r1 */
		INSN(BPF_ALU64 | BPF_MOV | BPF_X, 2, 10, 0, 0),         /* r2 = fp */
		INSN(BPF_ALU64 | BPF_ADD | BPF_K, 2, 0, 0, -8),         /* r2 -= 8 */
		INSN(BPF_ALU64 | BPF_MOV | BPF_K, 3, 0, 0, 8),          /* r3 = 8 */
		INSN(BPF_JMP | BPF_CALL, 0, 0, 0, write ? BPF_FUNC_probe_write_user
			: type == BPF_PROG_TYPE_SOCKET_FILTER ? BPF_FUNC_get_prandom_u32
			: BPF_FUNC_get_current_pid_tgid),
		INSN(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, 0),          /* r0 = 0 */
		INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
	};
	static char log[4096];
	union bpf_attr attr;
	zero(&attr, sizeof attr);
	attr.prog_type = type;
	attr.insns = (u64)prog;
	attr.insn_cnt = sizeof prog / sizeof prog[0];
	attr.license = (u64)"GPL";
	attr.log_buf = (u64)log;
	attr.log_size = sizeof log;
	attr.log_level = 1;
	copy(attr.prog_name, name, sizeof attr.prog_name - 1);
	long fd = sys(__NR_bpf, BPF_PROG_LOAD, (long)&attr, sizeof attr, 0, 0);
	if (fd < 0) { say(log); die("BPF_PROG_LOAD", fd); }
	return fd;
}

static long read_number(const char *path) {
	char buf[32]; long n = 0;
	long fd = sys(__NR_openat, -100, (long)path, 0, 0, 0);
	if (fd < 0) die(path, fd);
	long got = sys(__NR_read, fd, (long)buf, sizeof buf - 1, 0, 0);
	if (got <= 0) die(path, got ? got : -5);
	for (long i = 0; i < got && buf[i] >= '0' && buf[i] <= '9'; i++) n = n * 10 + buf[i] - '0';
	return n;
}

static int run(int argc, char **argv, char **envp) {
	(void)envp;
	if (argc >= 4 && eq(argv[1], "kprobe")) {
		long prog = load(BPF_PROG_TYPE_KPROBE, argv[3], argc > 4 && eq(argv[4], "write"));
		struct perf_event_attr pe;
		zero(&pe, sizeof pe);
		pe.size = sizeof pe;
		pe.type = read_number("/sys/bus/event_source/devices/kprobe/type");
		pe.kprobe_func = (u64)argv[2];
		pe.sample_period = 1;
		long ev = sys(__NR_perf_event_open, (long)&pe, -1, 0, -1, PERF_FLAG_FD_CLOEXEC);
		if (ev < 0) die("perf_event_open", ev);
		long r = sys(__NR_ioctl, ev, PERF_EVENT_IOC_SET_BPF, prog, 0, 0);
		if (r < 0) die("PERF_EVENT_IOC_SET_BPF", r);
		if ((r = sys(__NR_ioctl, ev, PERF_EVENT_IOC_ENABLE, 0, 0, 0)) < 0) die("enable", r);
	} else if (argc >= 4 && eq(argv[1], "rawtp")) {
		long prog = load(BPF_PROG_TYPE_RAW_TRACEPOINT, argv[3], argc > 4 && eq(argv[4], "write"));
		union bpf_attr attr;
		zero(&attr, sizeof attr);
		attr.raw_tracepoint.name = (u64)argv[2];
		attr.raw_tracepoint.prog_fd = prog;
		long link = sys(__NR_bpf, BPF_RAW_TRACEPOINT_OPEN, (long)&attr, sizeof attr, 0, 0);
		if (link < 0) die("BPF_RAW_TRACEPOINT_OPEN", link);
	} else if (argc >= 3 && eq(argv[1], "socket")) {
		load(BPF_PROG_TYPE_SOCKET_FILTER, argv[2], 0);
	} else {
		say("usage: bpfload kprobe SYMBOL NAME [write] | rawtp TRACEPOINT NAME [write] | "
		    "socket NAME\n");
		return 2;
	}
	say("loaded\n");
	for (;;) sys(__NR_pause, 0, 0, 0, 0, 0);
}
