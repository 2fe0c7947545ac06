// The x86-64 System V context switch of SIMT_FIBER_ASM (see fiber.h for the stack layout). It
// returns with pop + indirect jmp rather than ret: a ret into another context's call site would
// miss the return-stack predictor on every switch (2–3x slower, measured).
#if defined(SIMT_FIBER_ASM)
asm(R"(
  .text
  .globl simt_asm_switch
  .type simt_asm_switch, @function
  .p2align 4
simt_asm_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  popq %r8
  jmp *%r8
  .cfi_endproc
  .size simt_asm_switch, .-simt_asm_switch

  .globl simt_asm_trampoline
  .type simt_asm_trampoline, @function
  .p2align 4
simt_asm_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r13, %rdi
  callq *%r12
  ud2
  .cfi_endproc
  .size simt_asm_trampoline, .-simt_asm_trampoline
  .section .note.GNU-stack,"",@progbits
)");
#endif
