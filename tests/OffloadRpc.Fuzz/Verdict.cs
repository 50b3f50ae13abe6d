using MessagePack;

namespace OffloadRpc.Fuzz;

/// <summary>What the fuzzer reports as a crash: an unexpected exception, a hang, an assertion, a leak, an amplified allocation.</summary>
public sealed class FuzzFailure : Exception
{
    public FuzzFailure(string message, Exception? inner = null)
        : base(message, inner)
    {
    }
}

/// <summary>A Debug.Assert that fails: thrown instead of failing fast, so the fuzzer and the smoke test report it.</summary>
public sealed class AssertionFailedException : Exception
{
    public AssertionFailedException(string? message)
        : base("Debug.Assert failed: " + message)
    {
    }
}

/// <summary>
/// The documented outcomes of hostile input. A parser of peer input may end the connection with
/// <see cref="ProtocolViolationException"/> (or refuse a handshake with the typed exceptions of the
/// handshake); a violation raised while decoding MessagePack arguments or results carries what
/// MessagePack throws at malformed data. Anything else escaping is a bug.
/// </summary>
internal static class Verdict
{
    /// <summary>What MessagePack's reader and its formatters throw at malformed or hostile data (with untrusted-data security).</summary>
    public static bool IsDecodeError(Exception ex) => ex switch
    {
        ProtocolViolationException => true,
        EndOfStreamException => true,                       // truncated data, or a declared length past the end
        OverflowException => true,                          // an integer out of the target type's range
        InsufficientExecutionStackException => true,        // nested deeper than the security limit
        // MessagePack 2.5's reader, at a str32 or bin32 length of 2 GiB or more (read as a negative int),
        // slices its span with it: the span's own range check throws, without a parameter name. Found by
        // the reply target (corpus/reply/crash-str32-length-past-2GiB); the runtime ends the connection.
        ArgumentOutOfRangeException { ParamName: null } => true,
        MessagePackSerializationException { InnerException: null } => true,
        // A formatter converting a well-formed but impossible value (a timestamp past DateTime's range, a decimal that does not parse).
        MessagePackSerializationException { InnerException: ArgumentException or FormatException } => true,
        MessagePackSerializationException { InnerException: { } inner } => IsDecodeError(inner),
        _ => false,
    };

    /// <summary>A connection's terminal exception after hostile input: a violation (with a decode error inside, if any), or the peer's disconnection.</summary>
    public static void CheckTerminal(Exception? terminal, string where)
    {
        switch (terminal)
        {
            case null:
            case ObjectDisposedException:
            case PeerDisconnectedException:
                return;
            case ProtocolViolationException violation when violation.InnerException is null || IsDecodeError(violation.InnerException) || violation.InnerException is TimeoutException:
                return;
            default:
                throw new FuzzFailure($"{where}: the connection ended with {Describe(terminal)}", terminal);
        }
    }

    /// <summary>Rethrows <paramref name="ex"/> as a failure unless <paramref name="allowed"/> says it is a documented outcome.</summary>
    public static void Check(Exception ex, Func<Exception, bool> allowed, string where)
    {
        if (ex is FuzzFailure or AssertionFailedException)
        {
            throw new FuzzFailure($"{where}: {ex.Message}", ex);
        }

        if (!allowed(ex))
        {
            throw new FuzzFailure($"{where}: unexpected {Describe(ex)}", ex);
        }
    }

    public static string Describe(Exception ex)
    {
        var text = new System.Text.StringBuilder();
        for (Exception? e = ex; e is not null; e = e.InnerException)
        {
            text.Append(text.Length == 0 ? string.Empty : " <- ").Append(e.GetType().Name).Append(": ").Append(e.Message);
        }

        return text.ToString();
    }
}
