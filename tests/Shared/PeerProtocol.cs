namespace OffloadRpc.Testing;

/// <summary>The methods the test peer's server serves, by id.</summary>
internal static class PeerMethods
{
    /// <summary>Replies with the request body and a copy of every payload (bytes really travel back).</summary>
    public const int Echo = 1;

    /// <summary>Replies with, per payload, its length and checksum (u64 each), after the body's checksum.</summary>
    public const int Checksum = 2;

    /// <summary>Replies with the server's mapped shared-memory bytes, live segments and open connections.</summary>
    public const int Stats = 3;

    /// <summary>Waits the body's i32 milliseconds, honouring cancellation; counts cancellations seen.</summary>
    public const int Sleep = 4;

    /// <summary>Throws InvalidOperationException("boom: " + body as UTF-8).</summary>
    public const int Throw = 5;

    /// <summary>Sends payload 0 back without copying (the lease moves back).</summary>
    public const int ReturnLease = 6;

    /// <summary>Rents the body's i32 bytes on the server, fills them from seed body[4..12] and returns the lease.</summary>
    public const int RentAndReturn = 7;

    /// <summary>Replies with the total payload length, reading only the first and last byte of each.</summary>
    public const int Touch = 8;

    /// <summary>Holds payloads for the body's i32 milliseconds, then replies (like Sleep, payloads kept mapped).</summary>
    public const int Hold = 9;

    /// <summary>Tries to reply with 17 payloads (more than a message carries): the reply fails and the caller must get that as a fault.</summary>
    public const int BadReply = 10;

    /// <summary>Blocks its thread for the body's i32 milliseconds (a CPU-bound handler), then replies.</summary>
    public const int BlockSync = 11;

    /// <summary>Reads payload 0 as a stream as it arrives; replies (checksum u64, length i64, Stopwatch timestamp of the first read i64).</summary>
    public const int StreamChecksum = 12;
}
