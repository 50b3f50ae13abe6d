using Microsoft.Extensions.Logging;

namespace OffloadRpc.Diagnostics;

/// <summary>
/// Every message OffloadRpc logs (source-generated). Connections and failures only: nothing per call
/// at Information; a call is logged only when it is slower than <see cref="OffloadRpcOptions.SlowCallThreshold"/>.
/// </summary>
internal static partial class Log
{
    [LoggerMessage(EventId = 1, EventName = "ConnectionAccepted", Level = LogLevel.Information, Message = "Accepted a connection from process {PeerProcessId} (uid {PeerUserId}) on {Endpoint}")]
    public static partial void ConnectionAccepted(ILogger logger, int peerProcessId, uint peerUserId, string endpoint);

    [LoggerMessage(EventId = 2, EventName = "ConnectionRefused", Level = LogLevel.Warning, Message = "Refused a connection on {Endpoint}: {Reason}")]
    public static partial void ConnectionRefused(ILogger logger, string endpoint, string reason, Exception exception);

    [LoggerMessage(EventId = 3, EventName = "ProtocolViolation", Level = LogLevel.Warning, Message = "Closed the connection of {Role} with process {PeerProcessId}: {Reason}")]
    public static partial void ProtocolViolation(ILogger logger, string role, int peerProcessId, string reason, Exception exception);

    [LoggerMessage(EventId = 4, EventName = "PeerDisconnected", Level = LogLevel.Information, Message = "The peer process {PeerProcessId} of a {Role} connection disconnected or died: {Reason}")]
    public static partial void PeerDisconnected(ILogger logger, int peerProcessId, string role, string reason);

    [LoggerMessage(EventId = 5, EventName = "SlowCall", Level = LogLevel.Warning, Message = "Slow {Side} call {Method}: {ElapsedMilliseconds:F1} ms ({Status})")]
    public static partial void SlowCall(ILogger logger, string side, string method, double elapsedMilliseconds, string status);

    [LoggerMessage(EventId = 6, EventName = "ConnectionClosed", Level = LogLevel.Debug, Message = "A {Role} connection with process {PeerProcessId} closed: {Reason}")]
    public static partial void ConnectionClosed(ILogger logger, string role, int peerProcessId, string reason);

    [LoggerMessage(EventId = 7, EventName = "Connected", Level = LogLevel.Information, Message = "Connected to {Endpoint} (server process {PeerProcessId})")]
    public static partial void Connected(ILogger logger, string endpoint, int peerProcessId);

    [LoggerMessage(EventId = 8, EventName = "ServerStopping", Level = LogLevel.Information, Message = "Stopping the server on {Endpoint}: no new connections; {InFlight} calls in flight")]
    public static partial void ServerStopping(ILogger logger, string endpoint, int inFlight);

    [LoggerMessage(EventId = 9, EventName = "ServerCancellingCalls", Level = LogLevel.Warning, Message = "The server on {Endpoint} is cancelling {InFlight} calls still in flight at the end of the shutdown timeout")]
    public static partial void ServerCancellingCalls(ILogger logger, string endpoint, int inFlight);
}
