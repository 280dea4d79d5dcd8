/*
 * VMCP tiny test guest: prints "VMCP-GUEST-OK\n" on COM1 and halts forever.
 *
 * Lifecycle tests need a guest that boots in milliseconds and then costs no CPU;
 * a Linux kernel takes minutes under nested KVM. Cloud Hypervisor enters this
 * code through the PVH note in 32-bit protected mode (paging off); Firecracker
 * enters through the same note, and without it would enter the ELF entry in
 * 64-bit long mode. So every instruction below is one whose bytes decode to the
 * same operation in both modes (no REX, no push/pop, no 16-bit immediates that
 * change size): build.sh checks this by disassembling the code both ways.
 * Interrupts stay off, so `hlt` parks the vCPU until the VMM stops it.
 */

	.code32
	.section .text, "ax", @progbits
	.globl	_start
_start:
	cli				/* FA: no interrupt may wake us from hlt */
	cld				/* FC: lodsb walks forwards */
	mov	$0x3f8, %dx		/* 66 BA: COM1 data port (THR) */
	mov	$marker, %esi		/* BE imm32: zero-extends to rsi in long mode */
1:	lodsb				/* AC: al = *esi++ (rsi in long mode) */
	test	%al, %al
	jz	2f
	out	%al, %dx		/* EE: the emulated 16550 accepts every byte at once */
	jmp	1b
2:	hlt				/* F4 */
	jmp	2b

	.section .rodata, "a", @progbits
marker:
	.asciz	"VMCP-GUEST-OK\n"

/*
 * Xen PVH note: type 18 (XEN_ELFNOTE_PHYS32_ENTRY), name "Xen", 32-bit physical
 * entry address. Cloud Hypervisor refuses an ELF without it; linux-loader (used
 * by both VMMs) looks for it in a PT_NOTE segment.
 */
	.section .note.Xen, "a", @note
	.balign	4
	.long	4			/* n_namesz: "Xen\0" */
	.long	4			/* n_descsz: one 32-bit address */
	.long	18			/* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.balign	4
	.long	_start
	.balign	4
