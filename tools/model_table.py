"""Print the README's model table (markdown) from the registered models' pretrained cfgs."""
from timm.models import get_arch_pretrained_cfgs

from visattn import profile

PAPERS = {
    "arXiv:2204.07143": "[NAT](https://arxiv.org/abs/2204.07143)",
    "arXiv:2209.15001": "[DiNAT](https://arxiv.org/abs/2209.15001)",
    "arXiv:2303.08810": "[BiFormer](https://arxiv.org/abs/2303.08810)",
    "arXiv:2205.04437": "[HAT](https://arxiv.org/abs/2205.04437)",
    "arXiv:1807.02758": "[RCAN](https://arxiv.org/abs/1807.02758)",
    "arXiv:2008.08767": "[HAN](https://arxiv.org/abs/2008.08767)",
    "arXiv:2010.01073": "[PAN](https://arxiv.org/abs/2010.01073)",
    "arXiv:2104.09497": "[A2N](https://arxiv.org/abs/2104.09497)",
    "arXiv:2303.14324": "[TCSR](https://arxiv.org/abs/2303.14324)",
}


def _link_text(url: str, official: str) -> str:
    # Share links (OneDrive's .../root/content) name no file: show what the release calls it.
    name = url.rsplit("/", 1)[-1]
    return f"{official}.pth" if name == "content" else name


def _weights_cell(cfg) -> str:
    official = profile.official_name(cfg.to_dict())
    if cfg.tag is None:  # an architecture without any released weights
        return "none released (train with `train/sr.py`)"
    if cfg.file:  # trained by visattn, shipped in the package
        return f"`.{cfg.tag}` (visattn, scikit-image photos): bundled `visattn/weights/{cfg.file.rsplit('/', 1)[-1]}`"
    if not cfg.url:  # released on a share without stable links: the cfg notes name the file
        return f"`.{cfg.tag}` (`{official}`): no direct download (see `visattn info`)"
    return f"`.{cfg.tag}` (`{official}`): [{_link_text(cfg.url, official)}]({cfg.url})"


def main() -> None:
    print("| model | official | params (M) | GMACs | input | paper | weights: tag (official name): official checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for name in profile.list_visattn_models():
        s = profile.model_summary(name)
        weights = "<br>".join(_weights_cell(cfg) for cfg in get_arch_pretrained_cfgs(name).values())
        print(
            f"| `{name}` | `{s['official']}` | {s['params_m']:.1f} | {s['gmacs']:.1f} | {s['input_size'][1]} "
            f"| {PAPERS.get(s['paper_ids'], s['paper_ids'])} | {weights} |"
        )


if __name__ == "__main__":
    main()
