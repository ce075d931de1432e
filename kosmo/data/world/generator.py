"""The world's generator, one object for all it makes."""
from __future__ import annotations

from kosmo.data.world.chats import Conversations
from kosmo.data.world.documents import Documents
from kosmo.data.world.drawing import Drawing
from kosmo.data.world.signs import Signs


class World(Documents, Conversations, Drawing, Signs):
    """The generator. `World(WorldConfig(seed=1))` or `World(seed=1, image_size=64)`.

    Its parts: scenes and pictures (scenes.py), what is said about a scene (text.py), documents, episodes and
    picture recall (documents.py), chats and alignment prompts (chats.py),
    prompts for drawing and their evaluation items (drawing.py), pictures with text in them to read (signs.py).
    """
