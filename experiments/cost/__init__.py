"""What a method costs: analytic and fvcore FLOPs per image (``flops``), timed throughput against dense
(``throughput``), and the two together for a record (``costs``)."""
