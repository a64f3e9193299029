"""Both seed documents' Python examples, verbatim except that mx.array becomes np.array and
the second seed's undefined input_ids is the first seed's. The sizes are the seeds' own
(d_model 512, 12 layers, vocabularies of 32000 and 50000): on 2 cores each model builds in
under a second and generates at hundreds of tokens per second, so nothing is shrunk."""
import re

import numpy as np
import pytest


def test_seed_quick_start_and_usage_examples(capsys):
    from hybrid_mamba import HybridMambaConfig, HybridMambaModel

    # Configure model
    config = HybridMambaConfig(
        d_model=512,
        n_layers=12,
        attention_layers=[3, 6, 9],  # Attention at layers 3, 6, 9
        vocab_size=32000
    )

    # Create model
    model = HybridMambaModel(config, use_true_hybrid=False)

    # Generate text
    input_ids = np.array([[1, 2, 3, 4, 5]])
    output = model.generate(input_ids, max_new_tokens=50)

    assert output.shape == (1, 55)
    assert output[0, :5].tolist() == [1, 2, 3, 4, 5]
    assert output.min() >= 0 and output.max() < 32000

    # Simple generation
    generated = model.generate(
        input_ids,
        max_new_tokens=100,
        temperature=0.8,
        top_k=50  # Note: top_p not implemented
    )
    assert generated.shape == (1, 105)
    # Same seed (default 0), same settings but top_k: the first 50 new tokens may differ, the
    # prompt may not.
    assert generated[0, :5].tolist() == [1, 2, 3, 4, 5]

    # Routing Analysis (True Hybrid only): on a model made with use_true_hybrid=True.
    model = HybridMambaModel(config, use_true_hybrid=True)
    # Analyze routing decisions
    analysis = model.get_routing_analysis(input_ids)
    print(f"Mamba usage: {analysis['average_usage']['mamba']:.1%}")
    print(f"Attention usage: {analysis['average_usage']['attention']:.1%}")

    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"Mamba usage: \d+\.\d%", out[0]) and re.fullmatch(r"Attention usage: \d+\.\d%", out[1])
    usage = analysis["average_usage"]
    assert usage["mamba"] + usage["attention"] == pytest.approx(1.0)
    assert 0 < usage["attention"] < 1  # soft routing (the default) weighs both paths
    assert [l["layer"] for l in analysis["layers"]] == list(range(12))


def test_honest_mamba_basic_example_and_routing(capsys):
    from honest_mamba import HybridMambaConfig, HybridMambaModel

    input_ids = np.array([[1, 2, 3, 4, 5]])

    # Configure model
    config = HybridMambaConfig(
        d_model=512,
        n_layers=12,
        attention_layers=[3, 6, 9],  # For simple hybrid
        vocab_size=50000
    )

    # Create model
    model = HybridMambaModel(config, use_true_hybrid=False)  # Simple hybrid
    assert model.config.hybrid == "simple" and model.config.attention_layers == [3, 6, 9]
    # or
    model = HybridMambaModel(config, use_true_hybrid=True)   # True hybrid
    assert model.config.hybrid == "true" and model.config.true_layers == list(range(12))

    # Generate text
    output = model.generate(input_ids, max_new_tokens=50)
    assert output.shape == (1, 55) and output.max() < 50000

    # See how the model routes different patterns
    routing_info = model.get_routing_analysis(input_ids)
    print(f"Mamba usage: {routing_info['average_usage']['mamba']:.1%}")
    print(f"Attention usage: {routing_info['average_usage']['attention']:.1%}")

    out = capsys.readouterr().out.splitlines()
    mamba = float(re.fullmatch(r"Mamba usage: (\d+\.\d)%", out[0]).group(1))
    attention = float(re.fullmatch(r"Attention usage: (\d+\.\d)%", out[1]).group(1))
    assert mamba + attention == pytest.approx(100.0, abs=0.11)
