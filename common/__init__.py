"""The ground floor: torch-free helpers every layer may import (files, seeds, faces, version); it imports no layer.

    common.files    run directories, atomic files and directories, sha256
    common.seeds    seed ranges and the one seed -> z rule (numpy, as NVlabs)
    common.faces    dlib face detection, FFHQ alignment, paste-back (numpy, Pillow, dlib)
    common.version  the installed stylecast version, from package metadata
"""
