"""Print the README's model table (markdown) from the registered models' pretrained cfgs."""
from timm.models import get_arch_pretrained_cfgs

from visattn import profile

PAPERS = {
    "arXiv:2204.07143": "[NAT](https://arxiv.org/abs/2204.07143)",
    "arXiv:2209.15001": "[DiNAT](https://arxiv.org/abs/2209.15001)",
    "arXiv:2303.08810": "[BiFormer](https://arxiv.org/abs/2303.08810)",
}


def _link_text(url: str, official: str) -> str:
    # Share links (OneDrive's .../root/content) name no file: show what the release calls it.
    name = url.rsplit("/", 1)[-1]
    return f"{official}.pth" if name == "content" else name


def main() -> None:
    print("| model | official | params (M) | GMACs | input | paper | weights: tag (official name): official checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for name in profile.list_visattn_models():
        s = profile.model_summary(name)
        weights = "<br>".join(
            f"`.{cfg.tag}` (`{profile.official_name(cfg.to_dict())}`): [{_link_text(cfg.url, profile.official_name(cfg.to_dict()))}]({cfg.url})"
            for cfg in get_arch_pretrained_cfgs(name).values()
        )
        print(
            f"| `{name}` | `{s['official']}` | {s['params_m']:.1f} | {s['gmacs']:.1f} | {s['input_size'][1]} "
            f"| {PAPERS.get(s['paper_ids'], s['paper_ids'])} | {weights} |"
        )


if __name__ == "__main__":
    main()
