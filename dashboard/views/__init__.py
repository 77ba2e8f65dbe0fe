"""The dashboard's pages; each module has `render()`. `dashboard/app.py` picks one."""
