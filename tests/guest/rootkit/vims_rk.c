// SPDX-License-Identifier: GPL-2.0
/*
 * A test rootkit for the lab C-VM, built on the host against Debian's headers for
 * the lab kernel (tests/integration/test_rootkit_modules.py) and loaded in the
 * guest with insmod. It hooks the way KoviD, Singularity, Reptile and Caraxes do,
 * one technique per load:
 *
 *   mode=ftrace     ftrace_ops with a filter on __x64_sys_getdents64
 *   mode=kprobe     a kprobe with a pre-handler on __x64_sys_kill
 *   mode=netfilter  an IPv4 PRE_ROUTING hook in init_net (magic packets)
 *   mode=inline     a 5-byte jmp over the fentry NOP of __x64_sys_kexec_load (KHOOK)
 *   mode=syscall    the branch to __x64_sys_kexec_load inside x64_sys_call re-pointed
 *   mode=idt        a copy of the IDT with vector VECTOR re-pointed, loaded with lidt
 *   mode=rw         the page table entry mapping sys_call_table made writable
 *
 * orphan=1 copies the handler into fresh executable module-area memory, points the
 * hook there and fails its init, so the kernel frees the module: the hook runs code
 * no module owns, and no module list, kset or module-memory scan shows it. The
 * orphan page keeps the hook's structures at ORPHAN_STATE, so a later
 * "insmod vims_rk.ko undo=<handler address>" can take the hook down (tests clean up
 * the shared lab guest that way).
 *
 * The handlers do nothing (the ftrace and netfilter ones return at once; the
 * inline and syscall targets are only reached by kexec_load, which tests never
 * call): the checks judge where hooks point, not what handlers do.
 */
#include <linux/ftrace.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/vmalloc.h>
#include <net/net_namespace.h>
#include <asm/desc.h>

static char *mode = "ftrace";
module_param(mode, charp, 0);
static int orphan;
module_param(orphan, int, 0);
static unsigned long undo;
module_param(undo, ulong, 0);
#define VECTOR 0xf1  /* an unused system vector: the hook is never taken */

#define ORPHAN_STATE 0x800
struct rk_state {
	struct ftrace_ops *ops;
	struct kprobe *probe;
	struct nf_hook_ops *nfho;
};

/* The orphan handler, position independent so it runs the same wherever it is
 * copied (a compiled function would branch to the return thunk relative to its own
 * address): "mov eax, 1; ret" accepts a packet (NF_ACCEPT), "xor eax, eax; ret"
 * lets a kprobe single-step on (and ignores the rest). */
static const u8 accept_code[] = { 0xb8, 0x01, 0x00, 0x00, 0x00, 0xc3 };
static const u8 zero_code[] = { 0x31, 0xc0, 0xc3 };

typedef unsigned long (*lookup_fn)(const char *);
static lookup_fn lookup;

/* kallsyms_lookup_name is not exported since 5.7; rootkits find it through a kprobe. */
static int find_lookup(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	int err = register_kprobe(&kp);

	if (err)
		return err;
	lookup = (lookup_fn)kp.addr;
	unregister_kprobe(&kp);
	return 0;
}

/* Executable memory in the module area that outlives this module. */
static void *orphan_copy(const u8 *insns, size_t len)
{
	/* module_alloc() until 6.9, then execmem_alloc(EXECMEM_DEFAULT, size). */
	void *(*alloc)(unsigned long) = (void *)lookup("module_alloc");
	void *(*execmem)(int, unsigned long) = (void *)lookup("execmem_alloc");
	int (*set_x)(unsigned long, int) = (void *)lookup("set_memory_x");
	void *mem;

	if (!(alloc || execmem) || !set_x)
		return NULL;
	mem = alloc ? alloc(PAGE_SIZE) : execmem(0, PAGE_SIZE);
	if (!mem)
		return NULL;
	memset(mem, 0xcc, PAGE_SIZE);
	memcpy(mem, insns, len);
	set_x((unsigned long)mem, 1);
	return mem;
}

static void notrace rk_ftrace(unsigned long ip, unsigned long parent_ip,
			      struct ftrace_ops *op, struct ftrace_regs *fregs)
{
}

static int rk_kprobe(struct kprobe *p, struct pt_regs *regs)
{
	return 0;
}

static unsigned int rk_nf(void *priv, struct sk_buff *skb, const struct nf_hook_state *state)
{
	return NF_ACCEPT;
}

static struct rk_state rk;
static struct desc_ptr saved_idtr;
static pte_t *made_rw;
static gate_desc *idt_copy;
static void *code;
static u8 saved[5];
static unsigned long patched_at;

/* Write kernel text the way the kernel's own patching does (text_poke_bp under
 * text_mutex); neither is exported, both are found by name. */
static int poke(unsigned long addr, const u8 *insn)
{
	void (*bp)(void *, const void *, size_t, const void *) = (void *)lookup("text_poke_bp");
	struct mutex *text_mutex = (void *)lookup("text_mutex");

	if (!bp || !text_mutex)
		return -ENOENT;
	mutex_lock(text_mutex);
	bp((void *)addr, insn, 5, NULL);
	mutex_unlock(text_mutex);
	return 0;
}

static int jmp_to(unsigned long site, unsigned long target, u8 opcode)
{
	u8 insn[5] = { opcode };
	s32 rel = (s32)(target - (site + 5));

	memcpy(insn + 1, &rel, 4);
	memcpy(saved, (void *)site, 5);
	patched_at = site;
	return poke(site, insn);
}

/* The rel32 call/jmp inside x64_sys_call that reaches the handler. */
static unsigned long branch_in(unsigned long fn, unsigned long target)
{
	unsigned long p;

	for (p = fn; p < fn + 0x4000; p++) {
		u8 op = *(u8 *)p;
		s32 rel;

		if (op != 0xe8 && op != 0xe9)
			continue;
		memcpy(&rel, (void *)(p + 1), 4);
		if (p + 5 + rel == target)
			return p;
	}
	return 0;
}

static void unhook(struct rk_state *st)
{
	if (st->ops) {
		unregister_ftrace_function(st->ops);
		kfree(st->ops);
	}
	if (st->probe) {
		unregister_kprobe(st->probe);
		kfree(st->probe);
	}
	if (st->nfho) {
		nf_unregister_net_hook(&init_net, st->nfho);
		kfree(st->nfho);
	}
}

static int __init rk_init(void)
{
	int err = find_lookup();
	struct rk_state *st = &rk;

	if (err)
		return err;
	if (undo) {
		unhook((struct rk_state *)(undo + ORPHAN_STATE));
		memset((void *)(undo + ORPHAN_STATE), 0, sizeof(*st));
		return -EAGAIN;
	}
	if (orphan || !strcmp(mode, "inline") || !strcmp(mode, "syscall") || !strcmp(mode, "idt")) {
		code = !strcmp(mode, "netfilter") ? orphan_copy(accept_code, sizeof(accept_code))
						  : orphan_copy(zero_code, sizeof(zero_code));
		if (!code)
			return -ENOMEM;
		if (orphan) {
			st = code + ORPHAN_STATE;  /* the page is writable as well as executable */
			memset(st, 0, sizeof(*st));
		}
	}
	if (!strcmp(mode, "ftrace")) {
		st->ops = kzalloc(sizeof(*st->ops), GFP_KERNEL);
		if (!st->ops)
			return -ENOMEM;
		st->ops->func = code ? code : (ftrace_func_t)rk_ftrace;
		st->ops->flags = FTRACE_OPS_FL_RECURSION;
		err = ftrace_set_filter(st->ops, "__x64_sys_getdents64", strlen("__x64_sys_getdents64"), 0);
		if (!err)
			err = register_ftrace_function(st->ops);
	} else if (!strcmp(mode, "kprobe")) {
		st->probe = kzalloc(sizeof(*st->probe), GFP_KERNEL);
		if (!st->probe)
			return -ENOMEM;
		st->probe->symbol_name = "__x64_sys_kill";
		st->probe->pre_handler = code ? code : rk_kprobe;
		err = register_kprobe(st->probe);
		st->probe->symbol_name = NULL;  /* the name lives in this module's memory */
	} else if (!strcmp(mode, "netfilter")) {
		st->nfho = kzalloc(sizeof(*st->nfho), GFP_KERNEL);
		if (!st->nfho)
			return -ENOMEM;
		st->nfho->hook = code ? code : rk_nf;
		st->nfho->pf = NFPROTO_IPV4;
		st->nfho->hooknum = NF_INET_PRE_ROUTING;
		st->nfho->priority = NF_IP_PRI_FIRST;
		err = nf_register_net_hook(&init_net, st->nfho);
	} else if (!strcmp(mode, "inline")) {
		/* KHOOK: over the function's fentry NOP, its first instruction but for the
		 * ENDBR64 that IBT kernels (6.12) put before it. */
		static const u8 endbr64[] = { 0xf3, 0x0f, 0x1e, 0xfa };
		unsigned long fn = lookup("__x64_sys_kexec_load");

		if (!memcmp((void *)fn, endbr64, sizeof(endbr64)))
			fn += sizeof(endbr64);
		err = jmp_to(fn, (unsigned long)code, 0xe9);
	} else if (!strcmp(mode, "syscall")) {
		unsigned long site = branch_in(lookup("x64_sys_call"), lookup("__x64_sys_kexec_load"));

		err = site ? jmp_to(site, (unsigned long)code, *(u8 *)site) : -ENOENT;
	} else if (!strcmp(mode, "idt")) {
		/* IDT replacement: the CPU dispatches through a table no check reads in place
		 * of idt_table (one vCPU in the lab). */
		struct desc_ptr idtr;
		unsigned long handler = (unsigned long)code;

		idt_copy = (gate_desc *)get_zeroed_page(GFP_KERNEL);
		if (!idt_copy)
			return -ENOMEM;
		store_idt(&saved_idtr);
		memcpy(idt_copy, (void *)saved_idtr.address, saved_idtr.size + 1);
		idt_copy[VECTOR].offset_low = (u16)handler;
		idt_copy[VECTOR].offset_middle = (u16)(handler >> 16);
		idt_copy[VECTOR].offset_high = (u32)(handler >> 32);
		idtr.address = (unsigned long)idt_copy;
		idtr.size = saved_idtr.size;
		load_idt(&idtr);
	} else if (!strcmp(mode, "rw")) {
		/* What rootkits do instead of clearing CR0.WP: set RW in the entry that maps
		 * the table (a 2 MiB or 4 KiB mapping; lookup_address gives either). */
		unsigned int level;

		made_rw = lookup_address(lookup("sys_call_table"), &level);
		if (!made_rw)
			return -ENOENT;
		made_rw->pte |= _PAGE_RW;
	} else {
		err = -EINVAL;
	}
	if (err)
		return err;
	pr_info("vims_rk: %s hook in place%s\n", mode, orphan ? ", module leaving" : "");
	/* An orphan's hooks stay; the module's memory is freed by the failed load. */
	return orphan ? -EAGAIN : 0;
}

static void __exit rk_exit(void)
{
	void (*memfree)(void *) = (void *)(lookup("module_memfree") ?: lookup("execmem_free"));

	unhook(&rk);
	if (made_rw)
		made_rw->pte &= ~_PAGE_RW;
	if (idt_copy) {
		load_idt(&saved_idtr);
		free_page((unsigned long)idt_copy);
	}
	if (patched_at)
		poke(patched_at, saved);
	if (code && memfree)
		memfree(code);
}

module_init(rk_init);
module_exit(rk_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("VIMS test rootkit: hooks by ftrace, kprobe, netfilter and text patches");
