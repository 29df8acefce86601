"Render README.md from nbs/index.ipynb without quarto (nbdev-readme needs quarto, which cannot be installed offline)"
import json, re
from pathlib import Path

root = Path(__file__).resolve().parents[1]
nb = json.loads((root/'nbs'/'index.ipynb').read_text())
out = []
for cell in nb['cells']:
    src = ''.join(cell['source']).strip()
    if not src: continue
    if cell['cell_type'] == 'markdown':
        out.append(re.sub(r'\]\((?!https?:)(images/)', r'](nbs/\1', src))
        continue
    lines = src.splitlines()
    flags = [l for l in lines if l.startswith('#|')]
    if any('hide' in l or 'export' in l for l in flags): continue
    code = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
    out.append(f"```python\n{code}\n```")
(root/'README.md').write_text('<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook -->\n\n' + '\n\n'.join(out) + '\n')
print(root/'README.md')
