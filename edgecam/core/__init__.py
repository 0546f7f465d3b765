"""The pure core: model graph, head, classifier, preprocessing, CAM math, rendering, explanation methods."""
