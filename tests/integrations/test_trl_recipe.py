"""The plain-PyTorch recipe of docs/api.md ("In your own training loop"), run as written, against the naive
full-logits DPO loss."""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _recipe() -> str:
    section = API_DOC.read_text().split("## In your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_recipe_equals_the_naive_loss():
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    ref_model = transformers.LlamaForCausalLM(config)
    model = copy.deepcopy(ref_model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    pairs, length = 3, 12
    input_ids = torch.randint(0, 61, (2 * pairs, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding
    completion_mask = (torch.arange(length) >= torch.tensor([4, 5, 6, 4, 7, 5])[:, None]).long() * attention_mask
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}

    scope = {"model": model, "ref_model": ref_model, "batch": batch}  # the recipe works out P itself
    exec(_recipe(), scope)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    labels = input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]

    def naive_logps(net):
        logits = net(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * (labels != -100)).sum(1)

    with torch.no_grad():
        ref = naive_logps(ref_model)
    chosen, rejected = (naive_logps(model) - ref).chunk(2)
    loss = -F.logsigmoid(0.1 * (chosen - rejected)).mean()
    loss.backward()
    torch.testing.assert_close(scope["out"].loss, loss, rtol=1e-5, atol=1e-7)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-8, msg=name)
