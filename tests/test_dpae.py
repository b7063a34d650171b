import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ad_lightning.models.dpae import DPAE
from ad_lightning.nn.conv_ae import ConvAutoencoder, bottleneck_size
from tests.conftest import TEST_SEED, fit_and_test, synthetic_dm, untrained_results

SMALL = {"image_size": 64, "channels": 3, "latent_dim": 32, "widths": [32, 64, 32, 32, 32]}


def test_paper_architecture_at_224() -> None:
    """d, d, 256, 128, 3 transposed-conv channels from a 7x7 map, as in the paper."""
    ae = ConvAutoencoder(3, 224, latent_dim=64)
    outs = [m.out_channels for m in ae.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert outs == [64, 64, 256, 128, 3]
    assert ae.decoder.shape == (64, 7, 7)
    ae.eval()
    z, x_hat = ae(torch.rand(2, 3, 224, 224))
    assert z.shape == (2, 64) and x_hat.shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="divisible"):
        bottleneck_size(100, 5)


def test_prototype_update_follows_the_paper_rule() -> None:
    model = DPAE(image_size=32, latent_dim=2, widths=[4, 4], prototype_rate=0.5)
    model.v_p.copy_(torch.tensor([1.0, 2.0]))
    model.v_p_hat.copy_(torch.tensor([0.0, 0.0]))
    z = torch.tensor([[3.0, 0.0], [1.0, 4.0]])  # batch mean (2, 2)
    z_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0]])  # batch mean (2, 3)
    model.update_prototypes(z, z_hat)
    # delta v = mean(v - z) = (-1, 0); v <- v - 0.5 delta v
    assert model.v_p.tolist() == [1.5, 2.0]
    # delta v_hat = (-2, -3)
    assert model.v_p_hat.tolist() == [1.0, 1.5]
    model.prototype_rate = 1.0  # rate 1: the prototype becomes the batch mean
    model.update_prototypes(z, z_hat)
    assert model.v_p.tolist() == [2.0, 2.0] and model.v_p_hat.tolist() == [2.0, 3.0]


def test_training_step_uses_then_moves_the_prototypes() -> None:
    torch.manual_seed(0)
    model = DPAE(image_size=32, latent_dim=8, widths=[8, 8], reduction="sum", prototype_rate=0.25)
    x = torch.rand(4, 3, 32, 32)
    v0, vh0 = model.v_p.clone(), model.v_p_hat.clone()
    z, x_hat, z_hat = model(x)  # train mode: the same codes the step computes
    loss = model.training_step({"image": x, "label": torch.zeros(4)}, 0)
    per_image = (
        ((x - x_hat) ** 2).sum((1, 2, 3))
        + 0.5 * ((z - v0) ** 2).sum(1)
        + 0.5 * ((z_hat - vh0) ** 2).sum(1)
    )
    expected = per_image.mean()
    torch.testing.assert_close(loss, expected)  # loss used the prototypes before the update
    torch.testing.assert_close(model.v_p, v0 - 0.25 * (v0 - z.detach().mean(0)))
    torch.testing.assert_close(model.v_p_hat, vh0 - 0.25 * (vh0 - z_hat.detach().mean(0)))


def test_prototypes_are_buffers_saved_in_the_state_dict() -> None:
    model = DPAE(image_size=32, latent_dim=8, widths=[8, 8])
    state = model.state_dict()
    assert "v_p" in state and "v_p_hat" in state
    assert not any(p is model.v_p for p in model.parameters())
    other = DPAE(image_size=32, latent_dim=8, widths=[8, 8])
    assert not torch.equal(other.v_p, model.v_p)
    other.load_state_dict(state)
    assert torch.equal(other.v_p, model.v_p) and torch.equal(other.v_p_hat, model.v_p_hat)


def grads_after_step(loss_mode: str, **kw) -> tuple[DPAE, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = DPAE(image_size=32, latent_dim=8, widths=[8, 8], loss=loss_mode, **kw)
    x = torch.rand(4, 3, 32, 32)
    z, x_hat, z_hat = model(x)
    terms = model.loss_terms(x, z, x_hat, z_hat)
    loss = model.objective(terms)
    loss.backward()
    return model, loss, terms


def has_grad(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_loss_switches_change_what_is_optimised() -> None:
    both, loss, terms = grads_after_step("both")
    torch.testing.assert_close(
        loss, terms["reconstruction"] + terms["prototype"] + terms["prototype_hat"]
    )
    assert has_grad(both.encoder1) and has_grad(both.decoder) and has_grad(both.encoder2)

    # reconstruction only: the prototype terms are out; encoder-2 gets no gradient at all
    rec, loss, terms = grads_after_step("reconstruction")
    torch.testing.assert_close(loss, terms["reconstruction"])
    assert has_grad(rec.encoder1) and has_grad(rec.decoder) and not has_grad(rec.encoder2)

    # prototype only: no reconstruction term; the decoder learns only through z_hat's term,
    # so with gamma = 0 it gets no gradient while encoder-1 still does
    proto, loss, terms = grads_after_step("prototype")
    torch.testing.assert_close(loss, terms["prototype"] + terms["prototype_hat"])
    assert has_grad(proto.decoder) and has_grad(proto.encoder2)
    proto0, loss, terms = grads_after_step("prototype", gamma=0.0)
    assert has_grad(proto0.encoder1) and not has_grad(proto0.decoder)
    both0, _, _ = grads_after_step("both", gamma=0.0)
    assert has_grad(both0.decoder)  # ... which the reconstruction term would give it


def test_reductions_scale_the_papers_formula() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    losses = {}
    for reduction in ("sum", "pixel_mean", "mean"):
        torch.manual_seed(1)
        model = DPAE(
            image_size=32, latent_dim=8, widths=[8, 8], reduction=reduction, lam=2.0, gamma=0.5
        )
        z, x_hat, z_hat = model(x)
        losses[reduction] = model.objective(model.loss_terms(x, z, x_hat, z_hat))
    rec, pl1, pl2 = ((x - x_hat) ** 2), ((z - model.v_p) ** 2), ((z_hat - model.v_p_hat) ** 2)
    # the paper: sum ||x - x_hat||^2 + lambda/2 sum ||z - v_p||^2 + gamma/2 sum ||z_hat - v_p_hat||^2
    paper = (rec.sum((1, 2, 3)) + 1.0 * pl1.sum(1) + 0.25 * pl2.sum(1)).mean()
    torch.testing.assert_close(losses["sum"], paper)
    torch.testing.assert_close(
        losses["pixel_mean"], paper / (3 * 32 * 32)
    )  # same objective, scaled
    torch.testing.assert_close(losses["mean"], rec.mean() + 1.0 * pl1.mean() + 0.25 * pl2.mean())


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial prototypes on both ranks
    model = DPAE(image_size=32, latent_dim=2, widths=[4, 4], prototype_rate=0.5)
    z = (
        torch.tensor([[4.0, 0.0], [2.0, 2.0], [0.0, 4.0]])
        if rank == 0
        else torch.tensor([[10.0, 10.0]])
    )
    model.update_prototypes(z, 2 * z)
    torch.save({"v_p": model.v_p, "v_p_hat": model.v_p_hat}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_prototypes_stay_in_sync_under_ddp(tmp_path: Path) -> None:
    """Two gloo ranks with different batches (3 and 1 images) apply one identical step."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    torch.testing.assert_close(r0["v_p"], r1["v_p"])
    torch.testing.assert_close(r0["v_p_hat"], r1["v_p_hat"])
    torch.manual_seed(0)
    init = DPAE(image_size=32, latent_dim=2, widths=[4, 4])
    mean = torch.tensor([16.0, 16.0]) / 4  # over all 4 images, not the mean of the rank means
    torch.testing.assert_close(r0["v_p"], init.v_p - 0.5 * (init.v_p - mean))
    torch.testing.assert_close(r0["v_p_hat"], init.v_p_hat - 0.5 * (init.v_p_hat - 2 * mean))


@pytest.mark.slow
@pytest.mark.learning
def test_dpae_learns_on_synthetic_object(synthetic_root, figure) -> None:
    dm = synthetic_dm(synthetic_root, "object", 64, normalize="none")
    # the paper's literal objective and SGD lr 1e-3; trains at 64 px with these widths
    make = lambda: DPAE(**SMALL, reduction="sum", lr=1e-3)  # noqa: E731
    pl.seed_everything(TEST_SEED)
    untrained = untrained_results(make(), dm)
    pl.seed_everything(TEST_SEED)
    results = fit_and_test(make(), dm, epochs=50)
    scores = {k: v["auroc"] for k, v in results["scores"].items()}
    before = {k: v["auroc"] for k, v in untrained["scores"].items()}
    gain = results["metrics"]["pixel_auroc"] - untrained["metrics"]["pixel_auroc"]
    print(f"DPAE AUROC {scores} (untrained {before}), {results['metrics']}, pixel gain {gain:.3f}")
    assert set(scores) == {"rlz", "rlx", "pl1", "pl2"}
    assert results["primary_score"] == "rlz"
    best = max(scores, key=scores.get)
    auroc = figure("best_score_auroc", scores[best])
    figure("best_score_over_untrained", scores[best] - before[best])
    pixel, gain = (
        figure("pixel_auroc", results["metrics"]["pixel_auroc"]),
        figure("pixel_gain", gain),
    )
    # Measured over seeds 0-4 (experiments/learning_margins/README.md), min / median / max:
    # the best image score's AUROC 0.833 / 0.919 / 0.977, its gain over the untrained model
    # -0.06 / 0.036 / 0.094: at image level on 38 synthetic images the untrained AE already
    # ranks the visible defects (rlx 0.89), so the image gain is no evidence either way
    # (recorded, not asserted) and the image AUROC only a sanity floor. The evidence that
    # holds is the map: pixel AUROC 0.908 / 0.962 / 0.989, gain 0.262 / 0.339 / 0.355.
    assert auroc > 0.75, scores
    assert pixel > 0.85 and gain > 0.2
    assert set(results["scores"]["rlz"]["at_defect_ratio"]) >= {"precision", "tpr", "tnr", "f1"}


def test_weight_decay_is_scaled_with_the_objective() -> None:
    """pixel_mean divides the paper's summed objective by C*H*W; the decay must follow, or
    it weighs C*H*W times more against the data term than in the paper (issue: ~150,000x)."""
    summed = DPAE(image_size=32, channels=3, reduction="sum", weight_decay=5e-4)
    scaled = DPAE(image_size=32, channels=3, reduction="pixel_mean", weight_decay=5e-4)
    decay = {
        name: m.configure_optimizers().param_groups[0]["weight_decay"]
        for name, m in (("sum", summed), ("pixel_mean", scaled))
    }
    assert decay["sum"] == 5e-4
    assert decay["pixel_mean"] * 3 * 32 * 32 == pytest.approx(5e-4)
    # same parameters, same data: the scaled objective's gradient (decay included) is the
    # summed one's divided by C*H*W, so SGD at lr * C*H*W takes exactly the same step
    scaled.load_state_dict(summed.state_dict())
    x = torch.rand(4, 3, 32, 32)
    grads = []
    for model in (summed, scaled):
        model.zero_grad()
        opt = model.configure_optimizers()
        model.train()
        torch.manual_seed(0)
        model.validation_loss({"image": x}).backward()
        wd = opt.param_groups[0]["weight_decay"]
        grads.append(
            torch.cat(
                [(p.grad + wd * p).flatten() for p in model.parameters() if p.grad is not None]
            )
        )
    torch.testing.assert_close(grads[1] * 3 * 32 * 32, grads[0], rtol=1e-3, atol=1e-4)
