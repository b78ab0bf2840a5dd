"""The stage-3 agent: what `lapo finetune` writes and `lapo label` / `lapo evaluate` read.

An `Agent` bundles the parts one method needs, in eval mode, as a plain nn.Module:

| method           | lam (LatentActionModel)        | decoder input             | policy                  |
| ---------------- | ------------------------------ | ------------------------- | ----------------------- |
| `lapo`           | pretrained, frozen             | latent z[t] (+ obs feats) | latent policy, optional |
| `idm-supervised` | IDM trained on the labels only | the IDM's output (pre)    | none                    |
| `bc`             | none                           | none                      | outputs true actions    |

`label(window)` answers "which action led o[t] to o[t+1]" (IDM + decoder);
`act(context)` answers "which action now" (policy, then a decoder for lapo). When the
policy was fine-tuned end to end, `act` uses its own copy of the decoder
(`act_decoder`) so that fine-tuning for acting never changes how `label` decodes.

Observation features (``use_obs_features``) are the frozen IDM's features of the
window o[t-k+1..t] with o[t] repeated as the next frame: the IDM's view of the
observation without the change, which `act` can compute from context alone, so
labelling and acting feed the decoder the same kind of input.

On disk (RUN_F, `lapo.runs.save_agent` / `lapo.runs.load_agent`): ``agent.safetensors``
(every weight, prefixed ``lam.``, ``decoder.``, ``act_decoder.``, ``policy.``) and
``agent.json`` (method, action space, context, frame gap, the configs and constructor
arguments of each part, provenance and final metrics under ``info``). No pickle anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import Tensor, nn

from lapo.models import ActionDecoder, LatentActionModel, LatentPolicy

METHODS = ("lapo", "idm-supervised", "bc")


class AgentError(ValueError):
    """An agent cannot do what was asked (no policy, no IDM) or its files are unusable."""


# --------------------------------------------------------------------------- shared pieces


def obs_features(lam: LatentActionModel, context: Tensor) -> Tensor:
    """context (B, k, C, H, W) -> (B, embed_dim): IDM features with o[t] repeated as o[t+1]."""
    window = torch.cat([context, context[:, -1:]], dim=1)  # (B, k+1, C, H, W)
    feats, _ = lam.idm(lam.prepare(window))  # (B, E)
    return feats


def _code_table(bottleneck: nn.Module) -> Tensor:
    """(heads, num_codes, D / heads): the latent part each code of each head stands for."""
    if hasattr(bottleneck, "codebook"):  # VQ: separate codebook per head, concatenated
        return bottleneck.codebook
    codes = torch.arange(bottleneck.num_codes, device=next(bottleneck.buffers()).device)
    return rearrange(bottleneck.codes_to_latent(codes[:, None]), "n d -> 1 n d")  # FSQ: one head


def policy_latent(policy: LatentPolicy, lam: LatentActionModel, context: Tensor) -> Tensor:
    """The latent action (B, latent_dim) the policy picks, differentiable w.r.t. the policy.

    continuous target: the predicted pre-quantisation latent through the frozen bottleneck
    (straight-through where it has no gradient, as VQ in eval mode). codes target: the
    argmax codes' latents on the forward pass, the softmax-expected latent's gradient on
    the backward pass. The bottleneck must be in eval mode (no noise, no codebook update).
    """
    pred = policy(context)  # (B, D) or (B, heads, num_codes)
    if policy.target == "continuous":
        latent = lam.bottleneck(pred).latent  # (B, D)
        return (
            latent
            if latent.requires_grad or not pred.requires_grad
            else pred + (latent - pred).detach()
        )
    table = _code_table(lam.bottleneck).to(pred.dtype)  # (heads, N, d)
    probs = pred.softmax(-1)  # (B, heads, N)
    soft = einsum(probs, table, "b h n, h n d -> b h d")  # (B, heads, d)
    hard = einsum(
        F.one_hot(pred.argmax(-1), probs.shape[-1]).to(pred.dtype), table, "b h n, h n d -> b h d"
    )
    return rearrange(hard + soft - soft.detach(), "b h d -> b (h d)")  # (B, D)


def policy_action_logits(
    policy: LatentPolicy,
    lam: LatentActionModel,
    decoder: ActionDecoder,
    context: Tensor,
    feats: Tensor | None = None,
) -> Tensor:
    """Action logits (B, A) (or vector (B, D)) of policy -> latent -> decoder, differentiable.

    A one-head code policy over a discrete action space is read as a mixture:
    p(a | o) = sum_n pi(n | o) p_dec(a | code n), returned as log-probabilities. Training
    that marginal likelihood moves probability between codes without the straight-through
    estimator, which on a weak policy drags the decoder towards the majority action (the
    demo's fine-tune fell from 0.59 to the 0.53 majority with it). Otherwise the latent of
    `policy_latent` goes through the decoder.
    """
    if policy.target == "codes" and decoder.discrete and lam.code_heads == 1:
        logits = policy(context)[:, 0].float()  # (B, N)
        table = _code_table(lam.bottleneck)[0].to(logits.dtype)  # (N, d)
        b, n = logits.shape
        codes_in = repeat(table, "n d -> (b n) d", b=b)
        obs_in = repeat(feats, "b e -> (b n) e", n=n) if feats is not None else None
        per_code = decoder(codes_in, obs_in).float().log_softmax(-1)  # (B*N, A)
        per_code = rearrange(per_code, "(b n) a -> b n a", b=b)
        return torch.logsumexp(logits.log_softmax(-1)[:, :, None] + per_code, dim=1)  # (B, A)
    return decoder(policy_latent(policy, lam, context), feats)


def action_loss(out: Tensor, actions: Tensor, discrete: bool) -> Tensor:
    """Cross-entropy on logits (B, A) vs (B,) int64, or MSE on (B, D) vs (B, D)."""
    if discrete:
        return F.cross_entropy(out.float(), actions.long())
    return F.mse_loss(out.float(), actions.float())


# --------------------------------------------------------------------------- the agent


class Agent(nn.Module):
    """IDM/LAM + decoder + policy of one stage-3 run (see the module docstring)."""

    def __init__(
        self,
        *,
        method: str,
        action_space: dict,
        context: int,
        frame_gap: int = 1,
        lam: LatentActionModel | None = None,
        decoder: ActionDecoder | None = None,
        policy: LatentPolicy | None = None,
        act_decoder: ActionDecoder | None = None,
        use_obs_features: bool = False,
        info: dict | None = None,
    ):
        super().__init__()
        if method not in METHODS:
            raise AgentError(f"lapo/agent.py: unknown method {method!r}; choose one of {METHODS}")
        self.method = method
        self.action_space = dict(action_space)
        self.context = int(context)
        self.frame_gap = int(frame_gap)
        self.lam = lam
        self.decoder = decoder
        self.policy = policy
        self.act_decoder = act_decoder  # the decoder fine-tuned with the policy (None: decoder)
        self.use_obs_features = use_obs_features
        self.info = dict(info or {})  # provenance and settings, written to agent.json
        if method != "bc" and (lam is None or decoder is None):
            raise AgentError(f"lapo/agent.py: method {method} needs an IDM (lam) and a decoder")
        if method == "bc" and policy is None:
            raise AgentError("lapo/agent.py: method bc needs a policy")

    @property
    def discrete(self) -> bool:
        return self.action_space["type"] == "discrete"

    @property
    def has_policy(self) -> bool:
        return self.policy is not None

    def _to_action(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder/policy output -> (action (B,) int64 or (B, D) float, confidence (B,))."""
        if self.discrete:
            probs = out.float().softmax(-1)  # (B, A)
            conf, action = probs.max(-1)
            return action, conf
        return out.float(), torch.ones(out.shape[0], device=out.device)

    # ------------------------------------------------------------------ label: IDM + decoder

    def label_logits(self, window: Tensor) -> tuple[Tensor, Tensor | None]:
        """window (B, k+1, C, H, W) -> (decoder output (B, A), latent (B, D) or None)."""
        if self.method == "bc":
            raise AgentError(
                "lapo/agent.py: a bc run has no IDM, so it cannot label transitions; "
                "use a run of method lapo or idm-supervised"
            )
        if self.method == "idm-supervised":  # the decoder reads the IDM's output; no bottleneck
            _, pre = self.lam.idm(self.lam.prepare(window))  # (B, D)
            return self.decoder(pre), None  # (B, A)
        enc = self.lam.encode(window)
        feats = obs_features(self.lam, window[:, : self.context]) if self.use_obs_features else None
        return self.decoder(enc["latent"], feats), enc["latent"]  # (B, A), (B, D)

    @torch.no_grad()
    def label(self, window: Tensor) -> dict[str, Tensor | None]:
        """The action of o[t] -> o[t+1] for windows (B, k+1, C, H, W) uint8.

        Returns action (B,) int64 or (B, D) float, confidence (B,) (probability of the
        action; 1 for continuous) and latent (B, latent_dim) or None.
        """
        out, latent = self.label_logits(window)
        action, conf = self._to_action(out)
        return {"action": action, "confidence": conf, "latent": latent}

    # ------------------------------------------------------------------ act: policy (+ decoder)

    def act_logits(self, context: Tensor) -> Tensor:
        """context (B, k, C, H, W) -> action logits (B, A) or vector (B, D), differentiable."""
        if self.policy is None:
            raise AgentError(
                f"lapo/agent.py: this {self.method} run has no policy, so it cannot act; "
                "run lapo finetune with --policy RUN_P (method lapo) or --method bc"
            )
        if self.method == "bc":
            return self.policy(context)  # (B, A)
        feats = obs_features(self.lam, context) if self.use_obs_features else None
        decoder = self.act_decoder if self.act_decoder is not None else self.decoder
        return policy_action_logits(self.policy, self.lam, decoder, context, feats)  # (B, A)

    @torch.no_grad()
    def act(self, context: Tensor, greedy: bool = True) -> Tensor:
        """Actions (B,) int64 (or (B, D) float) for context frames (B, k, C, H, W) uint8."""
        out = self.act_logits(context)
        if not self.discrete:
            return out.float()
        if greedy:
            return out.argmax(-1)
        return torch.distributions.Categorical(logits=out.float()).sample()

    def forward(self, context: Tensor) -> Tensor:
        return self.act_logits(context)
