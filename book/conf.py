"""Sphinx configuration of the book: the executed notebooks as chapters, read as they are (never executed here)."""

project = "Multi-task learning with sentence transformers: when and what to freeze"
author = "the mtl_utils authors"
extensions = ["myst_nb"]
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

nb_execution_mode = "off"  # the committed outputs are the content
nb_merge_streams = True
myst_heading_anchors = 3  # README links such as (#which-freezing-when) find their heading
myst_enable_extensions = ["dollarmath"]
suppress_warnings = ["myst.header"]  # notebooks open with a level-1 title and may skip a level below it

html_theme = "sphinx_book_theme"
html_title = "When and what to freeze"
html_theme_options = {
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
}
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
