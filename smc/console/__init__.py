"""The web console of ``smc serve``: the mesh as a picture, its history as a timeline.

Role: public API of :mod:`smc.console`. :class:`ConsoleHub` holds the console's live state (a
timeline index of the log, past states rebuilt on demand, the subscribers of live updates);
:func:`mount_console` adds the page and its JSON routes to the API application;
:func:`mesh_graph` turns projections into the map. The page itself (``static/``) is plain
JavaScript over the vendored Cytoscape.js graph library (MIT, licence beside it): no build step.
Concurrency: see each module; handlers run on the serve loop, log reads in worker threads.
"""

from smc.console._graph import ProxyState, backing_index, mesh_graph
from smc.console._routes import ConsoleHub, mount_console
from smc.console._timeline import Row, Timeline, TimelineQuery, diff_values
from smc.console._travel import PastState, TimeMachine

__all__ = [
    "ConsoleHub",
    "PastState",
    "ProxyState",
    "Row",
    "TimeMachine",
    "Timeline",
    "TimelineQuery",
    "backing_index",
    "diff_values",
    "mesh_graph",
    "mount_console",
]
