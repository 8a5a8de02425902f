"""What a federated job carries to its sites as script arguments: JSON, compressed and base64-encoded.

The resolved recipe travels this way (every site trains with exactly the settings the server was built
from, whatever the deployment layout), and so does the model description ``{class_path, args}`` that
the client script builds its LightningModule from.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any


def encode_json(data: Any) -> str:
    return base64.b64encode(zlib.compress(json.dumps(data).encode())).decode()


def decode_json(text: str) -> Any:
    return json.loads(zlib.decompress(base64.b64decode(text)))


def encode_recipe(recipe) -> str:
    return encode_json(recipe.resolved())


def decode_recipe(text: str):
    from fedxr.config import recipe_from_dict

    return recipe_from_dict(decode_json(text), "job arguments")
