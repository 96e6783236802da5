import torch

from coup_fast import noise


def test_philox_known_answer():
    # Random123's published Philox4x32-10 vector for counter 0, key 0: 6627e8d5 e169c58d ...
    r0, r1 = noise.philox_4x32(0, torch.zeros(1, dtype=torch.int64))
    assert (r0.item(), r1.item()) == (0x6627E8D5, 0xE169C58D)


def test_normal_statistics_and_independence_between_steps():
    z0 = noise.philox_normal(1234, 0, (200, 500))
    z1 = noise.philox_normal(1234, 1, (200, 500))
    n = z0.numel()
    for z in (z0, z1):
        assert abs(z.mean().item()) < 5 / n**0.5
        assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
        # Tail mass of a standard normal: P(|z| > 2) = 0.0455.
        assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 5 * (0.0455 / n) ** 0.5
    corr = torch.corrcoef(torch.stack([z0.flatten(), z1.flatten()]))[0, 1].item()
    assert abs(corr) < 5 / n**0.5


def test_same_seed_and_step_replay_bitwise():
    a = noise.philox_normal(7, 3, (4, 5), dtype=torch.float64)
    assert torch.equal(a, noise.philox_normal(7, 3, (4, 5), dtype=torch.float64))
    assert not torch.equal(a, noise.philox_normal(7, 4, (4, 5), dtype=torch.float64))
    assert not torch.equal(a, noise.philox_normal(8, 3, (4, 5), dtype=torch.float64))


def test_rng_table_rows():
    table = noise.rng_table(99, 4, "cpu")
    assert table.dtype == torch.int64 and table.tolist() == [[99, 0], [99, 1], [99, 2], [99, 3]]


def test_draw_seed_follows_generator():
    assert noise.draw_seed(torch.Generator().manual_seed(5)) == noise.draw_seed(torch.Generator().manual_seed(5))
    assert 0 <= noise.draw_seed() < noise.SEED_BOUND
