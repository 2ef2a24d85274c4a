"""Pure torch / numpy / faiss: backbones, features, banks, index, methods, scorer, artifacts; no Redis.

Importing the package first sets the native libraries' process-wide settings (``models.native``), before any
module here loads faiss.
"""

from models.native import configure_native_libraries

configure_native_libraries()
