"""A small case of every CUDA kernel, for compute-sanitizer (memcheck, racecheck) on a GPU:
forward and backward of bn_act and conv_bn_act in fp32 and bf16, NCHW and channels_last, with
sizes that exercise the vector and scalar paths and the mask's partial last word.

    compute-sanitizer --tool memcheck python tests/cuda_sanitizer_case.py
"""
import torch

import resfuse.functional as RF


def main():
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        for mf in (torch.contiguous_format, torch.channels_last):
            for shape in ((3, 16, 5, 7), (2, 8, 4, 4)):
                for act in ("relu", "silu"):
                    x = torch.randn(shape, device=dev, dtype=dtype).to(memory_format=mf).requires_grad_()
                    r = torch.randn_like(x).requires_grad_()
                    bw = torch.rand(shape[1], device=dev, dtype=dtype, requires_grad=True)
                    bb = torch.randn(shape[1], device=dev, dtype=dtype, requires_grad=True)
                    rm, rv = torch.zeros(shape[1], device=dev, dtype=dtype), torch.ones(shape[1], device=dev, dtype=dtype)
                    y = RF.bn_act(x, bw, bb, rm, rv, training=True, residual=r, activation=act,
                                  momentum=None, num_batches_tracked=torch.tensor(2, device=dev),
                                  backend="cuda")
                    y.backward(torch.randn_like(y))
                    w = torch.randn(shape[1], shape[1], 3, 3, device=dev, dtype=dtype, requires_grad=True)
                    y = RF.conv_bn_act(x, w, None, bw, bb, rm, rv, training=False, residual=r,
                                       activation=act, padding=1, backend="cuda")
                    y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    print("sanitizer case: done")


if __name__ == "__main__":
    main()
