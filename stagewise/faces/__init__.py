"""Faces: detect, align and mask every face (extract), and put the other domain's face back (swap).

``detect`` wraps mediapipe's bundled detector and face mesh, ``align`` the DFL face types (a similarity
transform of the landmarks to a canonical face, padded per face type), ``masks`` the landmark hull and
eye / mouth masks, ``video`` PyAV reading and writing, ``extract`` the align stage, ``blend`` and ``swap``
the swap stage.
"""
