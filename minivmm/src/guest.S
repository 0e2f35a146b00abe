# The qmig demo guest (see guest.rs). Assemble: as --64 -o g.o guest.S && objcopy -O binary g.o g.bin
# Every vCPU runs it; the VMM starts vCPU i with rdi = i, which picks its control
# block at CTRL + i * CTRL_STRIDE (its counter, checksum and working-set slice).
.intel_syntax noprefix
.code64
.set CTRL, 0x1000
.set CTRL_SHIFT, 7
.set COUNTER, 0
.set CHECKSUM, 8
.set BASE0, 16
.set PAGES0, 24
.set BASE1, 32
.set PAGES1, 40
.set INTERVAL, 48
.set LCG, 56
.set BUSY, 64
.set WRITES, 72
start:
    mov rbx, rdi
    shl rbx, CTRL_SHIFT
    add rbx, CTRL
    mov r13, [rbx+COUNTER]
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r12, rax
loop:
    inc r13
    mov [rbx+COUNTER], r13
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, r12
    jb reset
    mov rdx, rax
    sub rdx, r12
    cmp rdx, [rbx+INTERVAL]
    jb loop
    mov r12, rax
    mov rax, [rbx+LCG]
    movabs rcx, 6364136223846793005
    imul rax, rcx
    movabs rcx, 1442695040888963407
    add rax, rcx
    mov [rbx+LCG], rax
    shr rax, 33
    mov rcx, [rbx+PAGES0]
    mov rsi, [rbx+PAGES1]
    add rsi, rcx
    xor edx, edx
    div rsi
    cmp rdx, rcx
    jb seg0
    sub rdx, rcx
    mov rdi, [rbx+BASE1]
    jmp have
seg0:
    mov rdi, [rbx+BASE0]
have:
    shl rdx, 12
    add rdi, rdx
    mov rax, r13
    and eax, 511
    lea rdi, [rdi+rax*8]
    mov qword ptr [rbx+BUSY], 1
    mov rax, [rdi]
    mov [rdi], r13
    sub rax, r13
    sub [rbx+CHECKSUM], rax
    inc qword ptr [rbx+WRITES]
    mov qword ptr [rbx+BUSY], 0
    jmp loop
reset:
    mov r12, rax
    jmp loop
