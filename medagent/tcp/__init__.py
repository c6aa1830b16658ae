"""
Raw byte streams for the agent: ``tcp://host:port?startChar=%02&endChar=%03`` destinations.
A message is written as C{startChar payload endChar}; the peer's reply is the next such frame.
A pure framing codec (L{framing}), and the client Protocol with its sender (L{sender}).
"""
