namespace OffloadRpc;

/// <summary>
/// Headers and a deadline for the calls a caller makes while the scope is open (on this logical thread:
/// it flows across awaits), as gRPC's Metadata and deadline of CallOptions. Scopes nest: an inner scope
/// starts with the outer one's headers and never extends its deadline. For one call, open a scope
/// around that call.
/// <code>
/// using (OffloadCallScope.Begin().WithHeader("tenant", "acme").WithDeadline(TimeSpan.FromSeconds(2)))
/// {
///     await images.DetectAsync(batch, options);   // the server reads OffloadCallContext.Current.RequestHeaders["tenant"]
/// }
/// </code>
/// </summary>
public sealed class OffloadCallScope : IDisposable
{
    private static readonly AsyncLocal<OffloadCallScope?> s_current = new();
    private readonly OffloadCallScope? _outer;

    // Never changed in place: WithHeader puts a new map here, so a call in flight keeps the headers it started
    // with (it holds this map without copying it), and a nested scope shares its outer one's until it adds its own.
    private IReadOnlyDictionary<string, string> _headers;
    private bool _disposed;

    private OffloadCallScope(OffloadCallScope? outer)
    {
        _outer = outer;
        _headers = outer?._headers ?? System.Collections.ObjectModel.ReadOnlyDictionary<string, string>.Empty;
        Deadline = outer?.Deadline;
    }

    /// <summary>The innermost open scope on this logical thread, or null.</summary>
    public static OffloadCallScope? Current => s_current.Value;

    /// <summary>The headers every call in the scope carries.</summary>
    public IReadOnlyDictionary<string, string> Headers => _headers;

    /// <summary>The deadline (UTC) of every call in the scope, or null.</summary>
    public DateTime? Deadline { get; private set; }

    /// <summary>Opens a scope (inside the current one, if any). Dispose it to close it.</summary>
    public static OffloadCallScope Begin()
    {
        var scope = new OffloadCallScope(s_current.Value);
        s_current.Value = scope;
        return scope;
    }

    /// <summary>Adds (or replaces) a header. Names are case-sensitive; a name starting with "offloadrpc-" is reserved.</summary>
    public OffloadCallScope WithHeader(string name, string value)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(value);
        _headers = new Dictionary<string, string>(_headers, StringComparer.Ordinal) { [name] = value };
        return this;
    }

    /// <summary>Calls in the scope must complete within <paramref name="timeout"/> from now (or the outer scope's deadline, if sooner).</summary>
    public OffloadCallScope WithDeadline(TimeSpan timeout)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(timeout, TimeSpan.Zero);
        DateTime now = DateTime.UtcNow;
        return WithDeadline(timeout >= DateTime.MaxValue - now ? DateTime.MaxValue : now + timeout);
    }

    /// <summary>
    /// Calls in the scope must complete by <paramref name="deadlineUtc"/> (or the outer scope's deadline, if
    /// sooner). A local time is converted to UTC; one of unspecified kind is read as UTC.
    /// </summary>
    public OffloadCallScope WithDeadline(DateTime deadlineUtc)
    {
        DateTime deadline = Internal.CallMetadata.ToUtc(deadlineUtc);
        Deadline = Deadline is { } outer && outer < deadline ? outer : deadline;
        return this;
    }

    /// <summary>Closes the scope: the outer one is current again.</summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        if (s_current.Value == this)
        {
            s_current.Value = _outer;
        }
    }
}
