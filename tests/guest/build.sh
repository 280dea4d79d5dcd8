#!/usr/bin/env bash
# Build the VMCP tiny test guest (tests/guest/guest.S) into
# .cache/guest/vmcp-test-guest.elf with binutils only, and print its path.
# Skips the build when the output is newer than every input. Refuses to
# produce an image whose code would decode differently in 32- and 64-bit mode.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out_dir="$root/.cache/guest"
out="$out_dir/vmcp-test-guest.elf"
inputs=("$here/guest.S" "$here/guest.ld" "$here/build.sh")

up_to_date() {
	[[ -f "$out" ]] || return 1
	local input
	for input in "${inputs[@]}"; do
		[[ "$out" -nt "$input" ]] || return 1
	done
}

if up_to_date; then
	echo "guest: up to date" >&2
	echo "$out"
	exit 0
fi

for tool in as ld objdump; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "guest: error: '$tool' not found; it comes from GNU binutils (Debian/Ubuntu: apt-get install binutils)" >&2
		exit 1
	fi
done

mkdir -p "$out_dir"
work="$(mktemp -d "$out_dir/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

as --64 -o "$work/guest.o" "$here/guest.S"
ld -m elf_x86_64 -T "$here/guest.ld" -nostdlib --build-id=none -z noexecstack \
	-z max-page-size=0x1000 -o "$work/guest.elf" "$work/guest.o"

# Cloud Hypervisor runs this code in 32-bit mode, Firecracker may run it in
# 64-bit mode: both disassemblies must agree byte for byte and instruction for
# instruction. The only allowed difference is the name of lodsb's implicit
# address register (esi/rsi); anything else (push, inc, REX) is a failure.
disasm() {
	objdump -d -j .text -m "$1" "$work/guest.elf" | sed -n '/^ *[0-9a-f]*:/p' |
		sed 's/%ds:(%rsi)/%ds:(%esi)/'
}
if ! diff <(disasm i386) <(disasm i386:x86-64) >&2; then
	echo "guest: error: guest.S contains code that decodes differently in 32- and 64-bit mode" >&2
	exit 1
fi

mv "$work/guest.elf" "$out"
echo "guest: built" >&2
echo "$out"
