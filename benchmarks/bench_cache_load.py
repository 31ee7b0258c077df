"""Cache-hit load time of an SDXL-size W8A8 UNet (CPU): what a second FPQuantPipeline / node call pays.

The quantized state is built directly (meta skeleton, quantized layers, random codes), so no 10 GB float model is
needed. Run: python benchmarks/bench_cache_load.py  (prints JSON; committed as results/cache_load_cpu.json)
"""
import time, tempfile, json, torch
from fpq_plugin.models.unet_configs import build_unet
from fpq_plugin.api import iter_quantizable, set_submodule, state_bytes
from fpq_plugin.nn import quantized_type_for
from fpq_plugin.cache import QuantCache
unet = build_unet('sdxl', meta=True)
targets, _ = iter_quantizable(unet)
for name, m in targets:
    set_submodule(unet, name, quantized_type_for(m).empty_like(m, 'e4m3fn', 'e4m3fn'))
unet.to_empty(device='cpu')
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for n, t in unet.state_dict().items():
        if t.dtype == torch.uint8: t.copy_(torch.randint(0, 126, t.shape, generator=g, dtype=torch.uint8))
        elif n.endswith('scale'): t.fill_(0.01)
        else: t.normal_(0, 0.02, generator=g)
print('quantized state MiB', state_bytes(unet)/2**20)
root = tempfile.mkdtemp()
cache = QuantCache(root)
t = time.perf_counter(); cache.put('k'*24, unet, recipe='w8a8', model_fingerprint='sha256:'+'0'*64); put = time.perf_counter()-t
del unet
res = []
for i in range(3):
    t = time.perf_counter(); got = cache.get('k'*24, expected_fingerprint='sha256:'+'0'*64); res.append(time.perf_counter()-t)
    assert got is not None
    del got
print(json.dumps({"what": "cache hit of an SDXL-size W8A8 UNet (794 quantized layers, random codes), CPU, 2 cores, file in page cache",
                  "put_s": round(put,2), "get_s": [round(r,2) for r in res]}))
