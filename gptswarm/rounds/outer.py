"""The outer optimizer of DiLoCo rounds: SGD with Nesterov momentum on the averaged pseudo-gradient
(theta_global - theta_local), run identically on the coordinator and every worker, on the CPU in
fp32, so that all of them reach bit-identical theta_global (checked by hash after each round)."""

import torch


def pseudo_gradient(theta, local):
    """theta_global - theta_local, per tensor name (fp32, CPU)."""
    return {k: theta[k] - local[k].detach().to("cpu", torch.float32) for k in theta}


@torch.no_grad()
def outer_step(theta, momentum, grad, lr=0.7, mu=0.9):
    """In place: buf = mu * buf + g; theta -= lr * (g + mu * buf)  (torch.optim.SGD, nesterov=True)."""
    for k in theta:
        g = grad[k]
        buf = momentum[k]
        buf.mul_(mu).add_(g)
        theta[k].sub_(g.add(buf, alpha=mu), alpha=lr)
