"""Print the ATEN_CPU_CAPABILITY that makes PyTorch use other fp32 kernels than this machine's own choice.

`make test` runs the kernel-numerics tests a second time under it, so a tolerance that only holds for one
CPU's summation order fails on any machine, not only on the other kind (AVX-512 machines are checked with the
AVX2 kernels, AVX2 machines with the plain C++ `default` ones). Prints nothing where no other level exists
(a machine that already runs `default`, or a non-x86 one), and `make test` then says so.
"""
import torch

OTHER = {"AVX512": "avx2", "AVX2": "default"}

if __name__ == "__main__":
    print(OTHER.get(torch.backends.cpu.get_cpu_capability(), ""))
